"""Event argument extraction cast as code (Code4Struct): the task source, its ontology, its verifier."""
