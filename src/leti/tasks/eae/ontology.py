"""The ontology of event argument extraction: event types with their roles and the entity types those
roles accept, read from GENEVA's event_ontology.json or from a user's ontology file, and named as the
Python classes the prompts define (docs/eae.md).
"""

from __future__ import annotations

import json
import keyword
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from leti.errors import LetiError

# Names the prompt itself defines or uses, and the parameter every __init__ has.
RESERVED_NAMES = {"Entity", "Event", "List", "annotations", "self"}


class EaeSourceError(LetiError):
    """An EAE data or ontology file that cannot be turned into problems; names file and line or key."""


# --- input files


class GenevaArgument(BaseModel):
    model_config = ConfigDict(extra="ignore")

    arg_name: str
    arg_desc: str = ""


class GenevaEventType(BaseModel):
    """One event type of GENEVA's meta_data/event_ontology.json (frames and flags are not used)."""

    model_config = ConfigDict(extra="ignore")

    arguments: dict[str, GenevaArgument]


class RoleRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    entity_types: list[str] = Field(default_factory=list, description="Empty: the role takes `Entity`.")


class EventTypeRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field(default="", description='The class docstring, e.g. a template "self.agent ..."')
    roles: dict[str, RoleRow]


class OntologyFile(BaseModel):
    """A user's ontology: entity types with their docstrings, and event types with typed roles."""

    model_config = ConfigDict(extra="forbid")

    entity_types: dict[str, str] = Field(default_factory=dict)
    event_types: dict[str, EventTypeRow]


# --- the ontology as classes


@dataclass(frozen=True)
class Role:
    name: str  # as the data names it, e.g. "Vehicle"
    attribute: str  # the keyword argument, e.g. "vehicle"
    description: str
    entity_types: tuple[str, ...]  # () takes Entity

    def annotation(self) -> str:
        return f"List[{' | '.join(self.entity_types or ('Entity',))}]"


@dataclass(frozen=True)
class EventClass:
    event_type: str  # as the data names it, e.g. "Movement:Transport"
    name: str  # the Python class, e.g. "Transport"
    parent: str | None  # e.g. "Movement"; None derives from Event
    description: str
    roles: tuple[Role, ...]  # sorted by attribute


@dataclass(frozen=True)
class Ontology:
    entity_types: dict[str, str]  # class name -> docstring
    events: dict[str, EventClass]  # by event type


def python_name(text: str, lower: bool = False) -> str:
    """A valid identifier for an event type, parent or role: every other character becomes "_"
    ("Commerce_money-transfer" -> "Commerce_money_transfer"); a keyword or reserved name gets "_" after it."""
    name = re.sub(r"\W", "_", text.lower() if lower else text, flags=re.ASCII)
    if name[:1].isdigit():
        name = "_" + name
    return name + "_" if keyword.iskeyword(name) or name in RESERVED_NAMES or not name else name


def load_ontology(path: str | os.PathLike[str]) -> Ontology:
    """Either GENEVA's event_ontology.json ({type: {arguments: {role: {arg_desc}}}}) or a user ontology
    ({entity_types: {...}, event_types: {type: {description, roles: {role: {entity_types}}}}})."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EaeSourceError(f"{path}: cannot read the ontology: {error}") from None
    if not isinstance(raw, dict):
        raise EaeSourceError(f"{path}: not a valid ontology: the top level must be an object")
    try:
        if "event_types" in raw:
            parsed = OntologyFile.model_validate(raw)
        else:
            parsed = OntologyFile(event_types={name: _from_geneva(row) for name, row in raw.items()})
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()
        )
        raise EaeSourceError(f"{path}: not a valid ontology: {problems}") from None
    return _build_ontology(parsed, str(path))


def _from_geneva(raw: object) -> EventTypeRow:
    row = GenevaEventType.model_validate(raw)
    roles = {name: RoleRow(description=argument.arg_desc.strip()) for name, argument in row.arguments.items()}
    return EventTypeRow(roles=roles)


def _build_ontology(parsed: OntologyFile, source: str) -> Ontology:
    for name in parsed.entity_types:
        if python_name(name) != name:
            raise EaeSourceError(f"{source}: entity_types.{name}: not a valid Python class name")
    events: dict[str, EventClass] = {}
    for event_type, row in parsed.event_types.items():
        parent, _, child = event_type.rpartition(":")
        roles = []
        for role_name, role in row.roles.items():
            unknown = sorted(set(role.entity_types) - set(parsed.entity_types))
            if unknown:
                raise EaeSourceError(
                    f"{source}: event_types.{event_type}.roles.{role_name}: unknown entity type "
                    f"{', '.join(unknown)}; declare it under entity_types"
                )
            attribute = python_name(role_name, lower=True)
            roles.append(Role(role_name, attribute, role.description, tuple(sorted(set(role.entity_types)))))
        attributes = [role.attribute for role in roles]
        if len(set(attributes)) != len(attributes):
            raise EaeSourceError(f"{source}: event_types.{event_type}: two roles share a keyword argument")
        events[event_type] = EventClass(
            event_type=event_type,
            name=python_name(child),
            parent=python_name(parent) if parent else None,
            description=row.description.strip(),
            roles=tuple(sorted(roles, key=lambda role: role.attribute)),
        )
    parents = {event.parent for event in events.values() if event.parent}
    names = [event.name for event in events.values()] + list(parsed.entity_types) + sorted(parents)
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise EaeSourceError(f"{source}: several types map to the Python class name {', '.join(clashes)}")
    return Ontology(dict(parsed.entity_types), events)
