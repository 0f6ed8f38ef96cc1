"""Event argument extraction as code (Code4Struct, as LETI uses it): OneIE JSONL + ontology -> Problems,
and the Arg-I / Arg-C metric of one sample.

One problem per event mention. The prompt defines the ontology as Python classes and asks for an
instance of the event's class; the model writes its keyword arguments (role lines) and the closing
parenthesis; `test_code` is the verifier of `leti.tasks.eae.verifier` with the gold arguments baked in.
docs/eae.md shows a whole prompt.

GENEVA (Parekh et al., ACL 2023) is CC BY 3.0; see `leti.tasks.sources` for where it comes from.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import os
from collections import Counter

from pydantic import BaseModel, ConfigDict, Field

from leti.io import iter_numbered_jsonl
from leti.records import Problem
from leti.tasks.eae.ontology import EaeSourceError, EventClass, Ontology, Role, load_ontology
from leti.tasks.eae.verifier import VERIFIER_FUNCTIONS, normalise_span

# Where the reference cut generations (re.split on '"""', 'class', 'print', '#'). The last three are
# anchored at a line start here, so that entity text such as "class action" or "#1" is not cut; a
# docstring never belongs in a role line. `data.extra_stop_sequences` adds others (a departure): "\ndef"
# helps Qwen2.5-Coder, which often follows the instance with a helper function that the '"""' of its
# docstring cuts into a SyntaxError, failing a correct instance.
EAE_STOP_SEQUENCES = ['"""', "\nclass", "\nprint", "\n#"]

ONTOLOGY_HEADER = """from __future__ import annotations

from typing import List

class Entity:
    def __init__(self, name: str):
        self.name = name

class Event:
    def __init__(self, name: str):
        self.name = name

"""


# --- input files


class OneieTrigger(BaseModel):
    start: int = Field(ge=0)
    end: int = Field(ge=1)


class OneieArgument(BaseModel):
    entity_id: str
    role: str


class OneieEntityMention(BaseModel):
    id: str
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    entity_type: str | None = None


class OneieEventMention(BaseModel):
    id: str
    event_type: str
    trigger: OneieTrigger
    arguments: list[OneieArgument]


class OneieRow(BaseModel):
    """One sentence of a OneIE file; the format's other fields (pieces, token_lens, ...) are not used."""

    model_config = ConfigDict(extra="ignore")

    wnd_id: str
    tokens: list[str] = Field(min_length=1)
    entity_mentions: list[OneieEntityMention]
    event_mentions: list[OneieEventMention]


# --- prompts


def docstring(text: str, indent: str = "    ") -> str:
    """`text` as a triple-quoted docstring line that no backslash or quote inside can break."""
    escaped = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    if escaped.endswith('"'):
        escaped = escaped[:-1] + '\\"'
    return f'{indent}"""{escaped}"""\n'


def class_source(name: str, base: str, roles: tuple[Role, ...], doc: str, super_init: bool) -> str:
    """An event class whose keyword arguments are its roles, each `role: List[...] = []`."""
    lines = [f"class {name}({base}):\n", docstring(doc) if doc else "", "    def __init__(\n        self,\n"]
    lines += [f"        {role.attribute}: {role.annotation()} = [],\n" for role in roles]
    lines.append("    ):\n")
    if super_init:
        lines.append("        super().__init__(\n")
        lines += [f"            {role.attribute}={role.attribute},\n" for role in roles]
        lines.append("        )\n")
    else:
        lines += [f"        self.{role.attribute} = {role.attribute}\n" for role in roles]
    return "".join(lines) + "\n"


def event_docstring(event: EventClass) -> str:
    """The event's own description, else what each role holds (GENEVA's arg_desc)."""
    if event.description:
        return event.description
    described = [f"self.{role.attribute}: {role.description}" for role in event.roles if role.description]
    return "\n    ".join(["", *described, ""]) if described else ""


def ontology_source(ontology: Ontology, event: EventClass) -> str:
    """The classes one event's prompt defines: the base classes, the entity types its roles (and its
    parent's) accept, the parent class with every role of its children, and the event class."""
    parent_roles: dict[str, Role] = {}
    if event.parent:
        for other in ontology.events.values():
            if other.parent == event.parent:
                parent_roles.update({role.attribute: role for role in other.roles})
    roles = [*event.roles, *parent_roles.values()]
    entity_types = sorted({entity_type for role in roles for entity_type in role.entity_types})
    parts = [ONTOLOGY_HEADER]
    for name in entity_types:
        doc = ontology.entity_types[name]
        parts.append(
            f"class {name}(Entity):\n{docstring(doc) if doc else ''}"
            "    def __init__(self, name: str):\n        super().__init__(name=name)\n\n"
        )
    if event.parent:
        ordered = tuple(sorted(parent_roles.values(), key=lambda role: role.attribute))
        parts.append(class_source(event.parent, "Event", ordered, "", super_init=False))
    parts.append(
        class_source(
            event.name, event.parent or "Event", event.roles, event_docstring(event), bool(event.parent)
        )
    )
    return "".join(parts)


def event_variable(event: EventClass) -> str:
    return f"{event.name.lower()}_event"


def eae_prompt(ontology: Ontology, event: EventClass, tokens: list[str], trigger: OneieTrigger) -> str:
    """The ontology, the instruction with the trigger marked, and `x_event = X(` for the model to continue."""
    marked = list(tokens)
    marked[trigger.start] = f"**{marked[trigger.start]}"
    marked[trigger.end - 1] = f"{marked[trigger.end - 1]}**"
    sentence = " ".join(marked).replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    instruction = (
        f"Translate the following sentence into an instance of {event.name}. "
        "The trigger word(s) of the event is marked with **trigger word**."
    )
    return (
        f'{ontology_source(ontology, event)}"""\n{instruction}\n"{sentence}"\n"""\n'
        f"{event_variable(event)} = {event.name}("
    )


# --- problems

GoldArgument = tuple[str, str, str]  # (role, entity class, text)


def reference_solution(event: EventClass, gold: list[GoldArgument]) -> str:
    """The gold completion: one line per role with arguments, in the prompt's (sorted) order."""
    lines = []
    for role in event.roles:
        entities = [
            f"{entity}({json.dumps(text, ensure_ascii=False)})"
            for name, entity, text in gold
            if name == role.name
        ]
        if entities:
            lines.append(f"    {role.attribute}=[{', '.join(entities)}],\n")
    return "".join(lines) + ")"


@functools.cache
def verifier_functions() -> str:
    return "\n\n".join(inspect.getsource(function) for function in VERIFIER_FUNCTIONS)


def verifier_code(event: EventClass, gold: list[GoldArgument], tokens: list[str], strict: bool) -> str:
    """The verifier's functions, the gold data, and one call on the model's event variable. The call
    line names no gold data: a traceback shows it, and the traceback is training text."""
    role_names = {role.attribute: role.name for role in event.roles}
    return (
        f"\n\n{verifier_functions()}\n\n"
        f"EAE_GOLD = {gold!r}\n"
        f"EAE_SENTENCE = {' '.join(tokens)!r}\n"
        f"EAE_ROLE_NAMES = {role_names!r}\n"
        f"verify_event({event_variable(event)}, EAE_GOLD, EAE_SENTENCE, EAE_ROLE_NAMES, strict={strict})\n"
    )


def gold_arguments(
    row: OneieRow, mention: OneieEventMention, event: EventClass, where: str
) -> list[GoldArgument]:
    """(role, entity class, text) of each distinct gold argument; the text is the sentence's tokens."""
    entities = {entity.id: entity for entity in row.entity_mentions}
    roles = {role.name: role for role in event.roles}
    gold: list[GoldArgument] = []
    for argument in mention.arguments:
        entity = entities.get(argument.entity_id)
        if entity is None:
            raise EaeSourceError(f"{where}: argument entity {argument.entity_id!r} is not an entity mention")
        role = roles.get(argument.role)
        if role is None:
            raise EaeSourceError(
                f"{where}: {mention.event_type} has no role {argument.role!r} in the ontology"
            )
        entity_class = "Entity"
        if role.entity_types:
            if entity.entity_type not in role.entity_types:
                raise EaeSourceError(
                    f"{where}: {argument.entity_id} has entity type {entity.entity_type!r}, but role "
                    f"{argument.role} of {mention.event_type} accepts {', '.join(role.entity_types)} in the ontology"
                )
            entity_class = entity.entity_type
        text = " ".join(row.tokens[entity.start : entity.end])
        if not any(r == role.name and normalise_span(t) == normalise_span(text) for r, _, t in gold):
            gold.append((role.name, entity_class, text))
    return gold


def load_eae(
    path: str | os.PathLike[str],
    ontology_path: str | os.PathLike[str],
    dataset: str,
    split: str,
    strict: bool = False,
) -> list[Problem]:
    """One problem per event mention of a OneIE JSONL file, in file order."""
    ontology = load_ontology(ontology_path)
    problems: list[Problem] = []
    for line_number, row in iter_numbered_jsonl(path, OneieRow):
        where = f"{path}:{line_number}"
        for mention in row.event_mentions:
            event = ontology.events.get(mention.event_type)
            if event is None:
                raise EaeSourceError(f"{where}: event type {mention.event_type!r} is not in {ontology_path}")
            spans = [(entity.start, entity.end) for entity in row.entity_mentions] + [
                (mention.trigger.start, mention.trigger.end)
            ]
            if any(start >= end or end > len(row.tokens) for start, end in spans):
                raise EaeSourceError(f"{where}: a span lies outside the sentence's {len(row.tokens)} tokens")
            gold = gold_arguments(row, mention, event, where)
            problems.append(
                Problem(
                    task_id=f"{dataset}/{split}/{row.wnd_id}/{mention.id}",
                    dataset=dataset,
                    split=split,
                    prompt=eae_prompt(ontology, event, row.tokens, mention.trigger),
                    test_code=verifier_code(event, gold, row.tokens, strict),
                    reference_solution=reference_solution(event, gold),
                    stop_sequences=EAE_STOP_SEQUENCES,
                )
            )
    counts = Counter(problem.task_id for problem in problems)
    repeated = sorted(task_id for task_id, count in counts.items() if count > 1)
    if repeated:
        raise EaeSourceError(f"{path}: duplicate event mention {', '.join(repeated[:5])}")
    return problems


# --- the metric of one sample


def parsed_arguments(source: str) -> set[tuple[str, str]] | None:
    """{(normalised span, keyword)} of the `x = Event(...)` that `source` starts with; None if no prefix
    of whole lines parses into it.

    The shortest such prefix is read, so what a model writes after the closing parenthesis (a helper
    function cut at a stop sequence, say) does not matter, as Code4Struct's parser also keeps the lines
    up to the closing one. Each `Type("text")` or `Type(name="text")` in a keyword's list or tuple is one
    argument; anything else counts nothing.
    """
    lines = source.split("\n")
    for end in range(1, len(lines) + 1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
        except (SyntaxError, ValueError):
            continue
        statement = tree.body[0] if tree.body else None
        if not (isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Call)):
            return None
        found = set()
        for keyword_node in statement.value.keywords:
            if keyword_node.arg is None or not isinstance(keyword_node.value, ast.List | ast.Tuple):
                continue
            for element in keyword_node.value.elts:
                text = _entity_text(element)
                if text is not None:
                    found.add((normalise_span(text), keyword_node.arg))
        return found
    return None


def _entity_text(node: ast.expr) -> str | None:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return None
    values = list(node.args) + [k.value for k in node.keywords if k.arg == "name"]
    if len(values) == 1 and isinstance(values[0], ast.Constant) and isinstance(values[0].value, str):
        return values[0].value
    return None


def argument_counts(problem: Problem, completion: str) -> dict[str, int]:
    """Predicted, gold and matched arguments of one sample, for micro Arg-I / Arg-C scores.

    An argument is a distinct (span, role) pair; spans match after `normalise_span`. The event type is
    the prompt's, so Arg-I needs the span only and Arg-C the span and the role. A predicted pair is
    identified if its span is a gold span, each gold pair matched at most once (so a span given under
    two roles cannot identify one gold argument twice). Nothing is executed: the completion is parsed
    after the prompt's last line, and one that does not parse predicts nothing.
    """
    instantiation = problem.prompt.rsplit("\n", 1)[-1]
    gold = parsed_arguments(instantiation + "\n" + (problem.reference_solution or ")")) or set()
    predicted = parsed_arguments(instantiation + completion) or set()
    spans = {span for span, _ in predicted | gold}
    identified = sum(
        min(sum(1 for s, _ in predicted if s == span), sum(1 for s, _ in gold if s == span)) for span in spans
    )
    return {
        "predicted": len(predicted),
        "gold": len(gold),
        "arg_i_matched": identified,
        "arg_c_matched": len(predicted & gold),
    }


def argument_scores(counts: dict[str, int]) -> dict[str, float]:
    """Micro precision, recall and F1 of Arg-I and Arg-C from summed counts (0 where a denominator is 0)."""
    scores = {}
    for level in ("arg_i", "arg_c"):
        matched = counts[f"{level}_matched"]
        precision = matched / counts["predicted"] if counts["predicted"] else 0.0
        recall = matched / counts["gold"] if counts["gold"] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores |= {f"{level}_precision": precision, f"{level}_recall": recall, f"{level}_f1": f1}
    return scores


class ArgumentMetric:
    """Arg-I / Arg-C as the task metric `leti evaluate` asks for (`leti.evaluate.TaskMetric`)."""

    def counts(self, problem: Problem, completion: str) -> dict[str, int]:
        return argument_counts(problem, completion)

    def scores(self, counts: dict[str, int]) -> dict[str, float]:
        return argument_scores(counts)
