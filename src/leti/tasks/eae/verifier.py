"""The verifier of event argument extraction, as the source text every EAE problem's test_code embeds.

The functions below are copied verbatim into each problem's `test_code` (with `inspect.getsource`)
and run in the sandbox after the model's completion, so they use only builtins (no imports, no
module-level names) and never see anything but the event object and the gold data baked in beside
them. The same `normalise_span` scores samples in `leti.tasks.eae.source.argument_counts`, so the verifier and the
metric agree on what a matching span is.

The messages are the reference's (xingyaoww/LeTI, leti/verifier/eae), matched on text spans instead of
spaCy head words. `strict` adds two checks the reference lacks (docs/eae.md).
"""


def normalise_span(text):
    """Lower case, single spaces, and no leading article when words follow it: "The  Boat" -> "boat"."""
    words = str(text).lower().split()
    if len(words) > 1 and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def predicted_arguments(event, role_names):
    """[(role, entity class name, text)] from the event object, in the order its roles were set.

    Raises the reference's ValueError for a role whose value is not a list of entity instances.
    """
    found = []
    for attribute, values in vars(event).items():
        role = role_names.get(attribute, attribute[:1].upper() + attribute[1:])
        if not hasattr(values, "__iter__"):
            raise ValueError(f"Expecting a list of Entity instance for role {role}, but got {type(values)}")
        for value in values:
            if "name" not in getattr(value, "__dict__", {}):
                raise ValueError(
                    f"Expecting a list of Entity instance for role {role} with .name attribute, "
                    f"but got a list of {type(value)}"
                )
            found.append((role, type(value).__name__, str(value.name)))
    return found


def verify_event(event, gold, sentence, role_names, strict):
    """Raise unless `event` holds exactly the gold arguments: `gold` is [(role, entity type, text)].

    Every predicted argument must match a gold span (whitespace, case and a leading article aside)
    under its gold role; then every gold argument must have been found.
    """
    gold_roles = {}
    for role, entity_type, text in gold:
        gold_roles.setdefault(normalise_span(text), {})[role] = entity_type
    padded_sentence = " " + normalise_span(sentence) + " "
    identified = {}
    for role, entity_type, text in predicted_arguments(event, role_names):
        span = normalise_span(text)
        if " " + span + " " not in padded_sentence:
            if strict:
                raise ValueError(f'An identified argument "{text}" does not occur in the sentence.')
            # The reference drops a span it cannot find in the sentence, silently.
            continue
        if span not in gold_roles:
            raise ValueError(f'An identified argument "{text}" does not match any ground truth argument.')
        if role not in gold_roles[span]:
            raise ValueError(
                f'A successfully identified argument "{text}" is assigned to wrong role "{role}"'
            )
        if strict and entity_type != gold_roles[span][role]:
            raise ValueError(
                f'A successfully identified argument "{text}" is assigned to wrong entity type "{entity_type}"'
            )
        identified[(span, role)] = text
    expected = {(normalise_span(text), role) for role, _, text in gold}
    if len(identified) != len(expected):
        found = sorted(set(identified.values()))
        shown = "{" + ", ".join(repr(text) for text in found) + "}" if found else "set()"
        raise ValueError(
            f"Only {len(identified)} out of {len(expected)} arguments are correctly identified: {shown}"
        )


VERIFIER_FUNCTIONS = (normalise_span, predicted_arguments, verify_event)
