"""Task types: where problems come from (`sources`: MBPP, HumanEval, custom; `eae`: event argument
extraction) and what is checked of the model's programs beside the tests (`own_tests`)."""
