"""Event argument extraction as code: prompts, the verifier through the real docker sandbox, the metric."""

from __future__ import annotations

import json
import time
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from conftest import run_snakemake, tiny_pipeline_config

from leti.config import ExecuteConfig
from leti.execute import execute_samples, program_for, programs_for
from leti.io import read_json, read_jsonl
from leti.records import Execution, ExecutionStatus, Metrics, Probe, Problem, Sample, SandboxImage
from leti.sandbox import open_pool, run_programs
from leti.tasks.eae.ontology import EaeSourceError, load_ontology, python_name
from leti.tasks.eae.source import argument_counts, argument_scores, load_eae
from leti.tasks.sources import GENEVA_SPLIT_FILES, load_task_set

# A hand-made ACE-like ontology with entity types, in the user format (README).
ONTOLOGY = {
    "entity_types": {
        "FAC": "A functional, primarily man-made structure.",
        "GPE": "Geopolitical entities such as countries, provinces, states, cities, towns, etc.",
        "LOC": "Geographical entities such as geographical areas and landmasses, bodies of water",
        "ORG": "Corporations, agencies, and other groups of people.",
        "PER": "Person entities are limited to humans.",
        "VEH": "A physical device primarily designed to move an object from one location to another.",
        "WEA": "A physical device that is primarily used as an instrument for physically harming entities",
    },
    "event_types": {
        "Movement:Transport": {
            "description": "self.agent transported self.artifact in self.vehicle vehicle from self.origin "
            "place to self.destination place.",
            "roles": {
                "Vehicle": {"entity_types": ["VEH"]},
                "Artifact": {"entity_types": ["FAC", "PER", "ORG", "VEH", "WEA"]},
                "Destination": {"entity_types": ["LOC", "FAC", "GPE"]},
                "Origin": {"entity_types": ["LOC", "FAC", "GPE"]},
                "Agent": {"entity_types": ["ORG", "PER", "GPE"]},
            },
        },
        "Life:Die": {
            "roles": {"Victim": {"entity_types": ["PER"]}, "Place": {"entity_types": ["LOC", "GPE"]}}
        },
    },
}

SENTENCE = "a 30-foot Cuban patrol boat with four heavily armed men landed on American shores , utterly undetected by the Coast Guard ."
TOKENS = SENTENCE.split(" ")


def entity(identifier: str, start: int, end: int, entity_type: str) -> dict:
    return {
        "id": identifier,
        "start": start,
        "end": end,
        "text": " ".join(TOKENS[start:end]),
        "entity_type": entity_type,
    }


ROW = {
    "doc_id": "d1",
    "wnd_id": "d1-1",
    "sentence": " ".join(TOKENS),
    "tokens": TOKENS,
    "entity_mentions": [
        entity("E1", 0, 5, "VEH"),  # "a 30-foot Cuban patrol boat"
        entity("E2", 7, 10, "PER"),  # "heavily armed men"
        entity("E3", 12, 14, "LOC"),  # "American shores"
        entity("E4", 18, 21, "ORG"),  # "the Coast Guard"
    ],
    "event_mentions": [
        {
            "id": "EV1",
            "event_type": "Movement:Transport",
            "trigger": {"start": 10, "end": 11, "text": "landed"},
            "arguments": [
                {"entity_id": "E1", "text": "a 30-foot Cuban patrol boat", "role": "Vehicle"},
                {"entity_id": "E2", "text": "heavily armed men", "role": "Artifact"},
                {"entity_id": "E3", "text": "American shores", "role": "Destination"},
            ],
        }
    ],
}

GOLD_COMPLETION = (
    '\n    artifact=[PER("heavily armed men")],\n    destination=[LOC("American shores")],\n'
    '    vehicle=[VEH("a 30-foot Cuban patrol boat")],\n)'
)


def write_eae_files(
    folder: Path, rows: list[dict] | None = None, ontology: dict | None = None
) -> tuple[Path, Path]:
    data, ontology_path = folder / "transport.oneie.jsonl", folder / "ontology.json"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows or [ROW]))
    ontology_path.write_text(json.dumps(ontology or ONTOLOGY))
    return data, ontology_path


def transport_problem(folder: Path, strict: bool = False) -> Problem:
    folder.mkdir(exist_ok=True)
    data, ontology = write_eae_files(folder)
    (problem,) = load_task_set("ace", "test", data, ontology=ontology, strict=strict)
    return problem


# --- prompts and problems


def test_the_prompt_defines_typed_entity_classes_the_parent_and_the_event(tmp_path: Path) -> None:
    problem = transport_problem(tmp_path)
    assert problem.task_id == "ace/test/d1-1/EV1"
    assert problem.prompt.startswith("from __future__ import annotations\n\nfrom typing import List\n")
    # Only the entity types Transport's roles accept, sorted, each with its docstring.
    classes = [line for line in problem.prompt.splitlines() if line.startswith("class ")]
    assert classes == [
        "class Entity:",
        "class Event:",
        "class FAC(Entity):",
        "class GPE(Entity):",
        "class LOC(Entity):",
        "class ORG(Entity):",
        "class PER(Entity):",
        "class VEH(Entity):",
        "class WEA(Entity):",
        "class Movement(Event):",
        "class Transport(Movement):",
    ]
    assert '    """Person entities are limited to humans."""\n' in problem.prompt
    transport = problem.prompt[problem.prompt.index("class Transport(Movement):") :]
    assert transport.startswith(
        "class Transport(Movement):\n"
        '    """self.agent transported self.artifact in self.vehicle vehicle from self.origin place to '
        'self.destination place."""\n'
        "    def __init__(\n"
        "        self,\n"
        "        agent: List[GPE | ORG | PER] = [],\n"
        "        artifact: List[FAC | ORG | PER | VEH | WEA] = [],\n"
        "        destination: List[FAC | GPE | LOC] = [],\n"
        "        origin: List[FAC | GPE | LOC] = [],\n"
        "        vehicle: List[VEH] = [],\n"
        "    ):\n"
        "        super().__init__(\n"
    )
    assert problem.prompt.endswith(
        '"""\n'
        "Translate the following sentence into an instance of Transport. The trigger word(s) of the event "
        "is marked with **trigger word**.\n"
        '"a 30-foot Cuban patrol boat with four heavily armed men **landed** on American shores , utterly '
        'undetected by the Coast Guard ."\n'
        '"""\n'
        "transport_event = Transport("
    )
    assert problem.stop_sequences == ['"""', "\nclass", "\nprint", "\n#"]
    assert "\n" + problem.reference_solution == GOLD_COMPLETION


def test_geneva_prompts_use_entity_and_role_descriptions(geneva_dir: Path) -> None:
    problems = load_task_set("geneva", "validation", geneva_dir)
    first = problems[0]
    assert first.task_id == "geneva/validation/135_23605_4099587/135_23605_4099587_2302_0"
    assert "class Catastrophe(Event):\n" in first.prompt
    assert "    self.cause: The cause of the Undesirable_Event.\n" in first.prompt
    assert "        cause: List[Entity] = [],\n" in first.prompt
    assert first.prompt.endswith("catastrophe_event = Catastrophe(")
    assert first.reference_solution == '    cause=[Entity("natural")],\n    patient=[Entity("disaster")],\n)'
    assert len({problem.task_id for problem in problems}) == len(problems) == 1442


def test_event_types_become_valid_class_names(geneva_dir: Path) -> None:
    assert python_name("Commerce_money-transfer") == "Commerce_money_transfer"
    assert python_name("Transfer-Money") == "Transfer_Money"
    assert python_name("class") == "class_"
    assert python_name("Entity") == "Entity_"
    assert python_name("3D") == "_3D"
    ontology = load_ontology(geneva_dir / "meta_data" / "event_ontology.json")
    assert len(ontology.events) == 179
    assert ontology.events["Commerce_money-transfer"].name == "Commerce_money_transfer"
    assert all(event.name.isidentifier() for event in ontology.events.values())


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda row: row["event_mentions"][0].update(event_type="Life:Marry"),
            r"data.jsonl:2: event type 'Life:Marry'",
        ),
        (
            lambda row: row["event_mentions"][0]["arguments"][0].update(role="Pilot"),
            r"data.jsonl:2: .*no role 'Pilot'",
        ),
        (
            lambda row: row["event_mentions"][0]["arguments"][0].update(entity_id="E9"),
            r"data.jsonl:2: .*'E9'",
        ),
        (
            lambda row: row["entity_mentions"][0].update(entity_type="PER"),
            r"data.jsonl:2: E1 has entity type 'PER'",
        ),
        (lambda row: row["entity_mentions"][0].update(end=99), r"data.jsonl:2: a span lies outside"),
        (lambda row: row.pop("tokens"), r"data.jsonl:2: not a valid OneieRow record: tokens: Field required"),
    ],
)
def test_bad_oneie_lines_name_file_and_line(tmp_path: Path, change, expected: str) -> None:
    bad = json.loads(json.dumps(ROW))
    change(bad)
    data, ontology = write_eae_files(tmp_path, [ROW, bad])
    data = data.rename(tmp_path / "data.jsonl")
    with pytest.raises(Exception, match=expected):
        load_eae(data, ontology, "ace", "test")


def test_bad_ontologies_name_the_key(tmp_path: Path) -> None:
    ontology = json.loads(json.dumps(ONTOLOGY))
    ontology["event_types"]["Life:Die"]["roles"]["Victim"]["entity_types"] = ["HUM"]
    _, path = write_eae_files(tmp_path, ontology=ontology)
    with pytest.raises(
        EaeSourceError, match=r"ontology.json: event_types.Life:Die.roles.Victim: unknown entity type HUM"
    ):
        load_ontology(path)
    path.write_text('{"event_types": {"X": {"roles": {}, "template": "t"}}}')
    with pytest.raises(
        EaeSourceError, match=r"ontology.json: not a valid ontology: event_types.X.template: Extra inputs"
    ):
        load_ontology(path)


def test_duplicate_event_mentions_are_rejected(tmp_path: Path) -> None:
    data, ontology = write_eae_files(tmp_path, [ROW, ROW])
    with pytest.raises(EaeSourceError, match="duplicate event mention ace/test/d1-1/EV1"):
        load_eae(data, ontology, "ace", "test")


# --- the verifier, through the real docker sandbox


def run_in_sandbox(problem: Problem, completions: list[str], image: SandboxImage) -> list[Execution]:
    settings = ExecuteConfig()
    samples = [
        Sample(
            task_id=problem.task_id,
            completion=completion,
            policy_iteration=0,
            sample_index=index,
            seed=0,
            prompt_tokens=0,
            completion_tokens=0,
            finish_reason="stop",
        )
        for index, completion in enumerate(completions)
    ]
    with open_pool(settings, 2, image) as pool:
        return execute_samples(pool, samples, programs_for([problem], samples, "completions"), settings)


def completion(vehicle: str = 'VEH("a 30-foot Cuban patrol boat")', **roles: str) -> str:
    """The gold completion with `vehicle` replaced and other role lines added or replaced."""
    lines = {
        "artifact": 'PER("heavily armed men")',
        "destination": 'LOC("American shores")',
        "vehicle": vehicle,
    }
    lines |= roles
    body = "".join(f"    {role}=[{value}],\n" if value else "" for role, value in lines.items())
    return "\n" + body + ")"


# (completion, exception type, message) in the non-strict (reference) setting.
VERIFIER_CASES = {
    "gold": (GOLD_COMPLETION, None, None),
    "case, spaces and article do not matter": (
        completion(vehicle='VEH("30-foot  Cuban patrol BOAT")', destination='LOC("the American shores")'),
        None,
        None,
    ),
    "missing argument": (
        completion(destination=""),
        "ValueError",
        "Only 2 out of 3 arguments are correctly identified: {'a 30-foot Cuban patrol boat', 'heavily armed men'}",
    ),
    "nothing found": (
        "\n)",
        "ValueError",
        "Only 0 out of 3 arguments are correctly identified: set()",
    ),
    "wrong role": (
        completion(vehicle="", artifact='VEH("a 30-foot Cuban patrol boat"), PER("heavily armed men")'),
        "ValueError",
        'A successfully identified argument "a 30-foot Cuban patrol boat" is assigned to wrong role "Artifact"',
    ),
    "not a gold argument": (
        completion(agent='ORG("the Coast Guard")'),
        "ValueError",
        'An identified argument "the Coast Guard" does not match any ground truth argument.',
    ),
    "not a list": (
        "\n    vehicle=None,\n)",
        "ValueError",
        "Expecting a list of Entity instance for role Vehicle, but got <class 'NoneType'>",
    ),
    "a list of strings": (
        completion(vehicle='"a 30-foot Cuban patrol boat"'),
        "ValueError",
        "Expecting a list of Entity instance for role Vehicle with .name attribute, but got a list of <class 'str'>",
    ),
    "unknown role": (
        completion(ship='VEH("boat")'),
        "TypeError",
        "Transport.__init__() got an unexpected keyword argument 'ship'",
    ),
    "unknown class": (
        completion(vehicle='SHIP("a 30-foot Cuban patrol boat")'),
        "NameError",
        "name 'SHIP' is not defined",
    ),
    # The reference's two gaps: both pass unless strict.
    "wrong entity type": (completion(vehicle='PER("a 30-foot Cuban patrol boat")'), None, None),
    "span not in the sentence": (completion(origin='GPE("Havana")'), None, None),
}

STRICT_CASES = {
    "wrong entity type": (
        "ValueError",
        'A successfully identified argument "a 30-foot Cuban patrol boat" is assigned to wrong entity type "PER"',
    ),
    "span not in the sentence": (
        "ValueError",
        'An identified argument "Havana" does not occur in the sentence.',
    ),
}


def test_every_verifier_message_through_the_docker_sandbox(
    tmp_path: Path, sandbox_image: SandboxImage
) -> None:
    problem = transport_problem(tmp_path)
    executions = run_in_sandbox(problem, [case[0] for case in VERIFIER_CASES.values()], sandbox_image)
    outcomes = {
        name: (execution.exception_type, execution.exception_message)
        for name, execution in zip(VERIFIER_CASES, executions, strict=True)
    }
    assert outcomes == {name: (kind, message) for name, (_, kind, message) in VERIFIER_CASES.items()}
    for name, execution in zip(VERIFIER_CASES, executions, strict=True):
        expected_status = (
            ExecutionStatus.passed if VERIFIER_CASES[name][1] is None else ExecutionStatus.failed
        )
        assert execution.status is expected_status, name
    # The feedback is the traceback the model trains on: it ends with the message and shows the
    # verifier's call, but never the gold data.
    missing = executions[list(VERIFIER_CASES).index("missing argument")]
    assert missing.feedback.startswith('Traceback (most recent call last):\n  File "program.py", line ')
    assert (
        "    verify_event(transport_event, EAE_GOLD, EAE_SENTENCE, EAE_ROLE_NAMES, strict=False)\n"
        in missing.feedback
    )
    assert missing.feedback.endswith("ValueError: " + VERIFIER_CASES["missing argument"][2])
    assert "American shores" not in missing.feedback
    unknown_role = executions[list(VERIFIER_CASES).index("unknown role")]
    assert "    transport_event = Transport(\n" in unknown_role.feedback


def test_the_strict_verifier_closes_the_reference_gaps(tmp_path: Path, sandbox_image: SandboxImage) -> None:
    lenient = transport_problem(tmp_path / "lenient", strict=False)
    strict = transport_problem(tmp_path / "strict", strict=True)
    assert lenient.prompt == strict.prompt and lenient.reference_solution == strict.reference_solution
    assert lenient.test_code != strict.test_code
    completions = [GOLD_COMPLETION] + [VERIFIER_CASES[name][0] for name in STRICT_CASES]
    executions = run_in_sandbox(strict, completions, sandbox_image)
    assert executions[0].status is ExecutionStatus.passed
    outcomes = {
        name: (e.exception_type, e.exception_message)
        for name, e in zip(STRICT_CASES, executions[1:], strict=True)
    }
    assert outcomes == STRICT_CASES


@pytest.mark.slow
def test_every_geneva_reference_solution_passes_its_verifier(
    geneva_dir: Path, sandbox_image: SandboxImage, capsys: pytest.CaptureFixture
) -> None:
    problems = [
        problem for split in GENEVA_SPLIT_FILES for problem in load_task_set("geneva", split, geneva_dir)
    ]
    assert len(problems) == 3735
    started = time.monotonic()
    with open_pool(ExecuteConfig(), 2, sandbox_image) as pool:
        results = run_programs(
            pool, [program_for(problem, "\n" + problem.reference_solution) for problem in problems]
        )
    elapsed = time.monotonic() - started
    failures = {
        problem.task_id: f"{result.status.value}: {result.exception_type}: {result.exception_message}"
        for problem, result in zip(problems, results, strict=True)
        if result.status is not ExecutionStatus.passed
    }
    with capsys.disabled():
        print(
            f"\n{len(problems) - len(failures)} of {len(problems)} GENEVA reference solutions passed in {elapsed:.0f} s"
        )
    assert failures == {}


# --- the metric


def test_counts_of_constructed_predictions(tmp_path: Path) -> None:
    problem = transport_problem(tmp_path)
    cases = {
        GOLD_COMPLETION: (3, 3, 3, 3),
        "\n)": (0, 3, 0, 0),
        completion(destination=""): (2, 3, 2, 2),
        # boat under two roles identifies one gold argument once; men is right.
        completion(artifact='VEH("the 30-foot Cuban patrol boat"), PER("heavily armed men")'): (4, 3, 3, 3),
        completion(vehicle="", artifact='VEH("a 30-foot Cuban patrol boat"), PER("heavily armed men")'): (
            3,
            3,
            3,
            2,
        ),
        completion(agent='ORG("the Coast Guard")', origin='GPE("Havana")'): (5, 3, 3, 3),
        # Duplicates count once; name= works like a positional name.
        completion(vehicle='VEH(name="boat"), VEH("boat")'): (3, 3, 2, 2),
        # What follows the instance does not count, even when it does not parse.
        completion(destination="") + "\n\ndef translate(sentence):\n    ": (2, 3, 2, 2),
        '\n    vehicle=[VEH("a 30-foot Cuban patrol boat")])\nprint(transport_event': (1, 3, 1, 1),
        # Cut off before the end: it does not parse, so it predicts nothing.
        '\n    vehicle=[VEH("a 30-foot Cuban': (0, 3, 0, 0),
        # Parsed, never executed: an unknown class still names a span.
        completion(vehicle='SHIP("a 30-foot Cuban patrol boat")'): (3, 3, 3, 3),
        "\n    vehicle=None,\n)": (0, 3, 0, 0),
    }
    for text, (predicted, gold, identified, classified) in cases.items():
        counts = argument_counts(problem, text)
        assert counts == {
            "predicted": predicted,
            "gold": gold,
            "arg_i_matched": identified,
            "arg_c_matched": classified,
        }, text


def test_scores_match_an_independent_micro_average(tmp_path: Path) -> None:
    problem = transport_problem(tmp_path)
    completions = [
        GOLD_COMPLETION,
        "\n)",
        completion(destination=""),
        completion(agent='ORG("the Coast Guard")'),
    ]
    # Written out by hand: (predicted, gold, identified, classified) per completion above.
    by_hand = [(3, 3, 3, 3), (0, 3, 0, 0), (2, 3, 2, 2), (4, 3, 3, 3)]
    predicted, gold, identified, classified = (sum(column) for column in zip(*by_hand, strict=True))

    def f1(matched: int) -> float:
        precision, recall = Fraction(matched, predicted), Fraction(matched, gold)
        return float(2 * precision * recall / (precision + recall))

    summed: dict[str, int] = {}
    for text in completions:
        for key, value in argument_counts(problem, text).items():
            summed[key] = summed.get(key, 0) + value
    scores = argument_scores(summed)
    assert scores == pytest.approx(
        {
            "arg_i_precision": identified / predicted,
            "arg_i_recall": identified / gold,
            "arg_i_f1": f1(identified),
            "arg_c_precision": classified / predicted,
            "arg_c_recall": classified / gold,
            "arg_c_f1": f1(classified),
        }
    )
    assert scores["arg_i_f1"] == pytest.approx(16 / 21)  # P 8/9, R 8/12


def test_scores_are_zero_without_predictions_or_gold() -> None:
    nothing = {"predicted": 0, "gold": 0, "arg_i_matched": 0, "arg_c_matched": 0}
    assert set(argument_scores(nothing).values()) == {0.0}
    assert argument_scores(nothing | {"gold": 4})["arg_c_recall"] == 0.0


# --- a user's OneIE data with a typed ontology, through the whole DAG on the tiny model


@pytest.mark.slow
def test_a_custom_eae_dataset_runs_end_to_end(tmp_path: Path, mbpp_path: Path, tiny_raw_model: Path) -> None:
    rows = [json.loads(json.dumps(ROW).replace("d1-1", f"d1-{number}")) for number in range(1, 4)]
    data, ontology = write_eae_files(tmp_path, rows)
    config = tiny_pipeline_config(mbpp_path, tiny_raw_model, iterations=1)
    config["data"]["eae"] = {
        "ace": {"ontology": str(ontology), "splits": {"train": str(data), "test": str(data)}}
    }
    config["data"]["limits"] = {"ace/test": 2}
    config["generate"]["tasks"] = "ace/train"
    config["evaluate"]["tasks"] = ["ace/test"]
    config["evaluate"]["reward_prefix"] = "good"
    config["probe"]["tasks"] = ["ace/test"]
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))

    run = run_snakemake(workdir, "--cores", "2")
    assert run.returncode == 0, run.stderr[-5000:]

    problems = read_jsonl(workdir / "resources/tasks/ace/train.jsonl", Problem)
    assert [problem.task_id for problem in problems] == [
        "ace/train/d1-1/EV1",
        "ace/train/d1-2/EV1",
        "ace/train/d1-3/EV1",
    ]
    assert all("class VEH(Entity):\n" in problem.prompt for problem in problems)
    assert all("vehicle: List[VEH] = [],\n" in problem.prompt for problem in problems)
    executions = read_jsonl(workdir / "results/base/rollouts/ace/train/executions.jsonl", Execution)
    assert len(executions) == 3 * 2
    for folder in ("base/eval-none", "textual/iter1/eval-good", "binary/iter1/eval-good"):
        metrics = read_json(workdir / "results" / folder / "ace/test/metrics.json", Metrics)
        assert (metrics.dataset, metrics.num_problems, metrics.task_metric) == ("ace", 2, "eae")
        assert set(metrics.task_metrics) == {
            f"arg_{level}_{score}" for level in "ic" for score in ("precision", "recall", "f1")
        }
    # Its reference solutions (the gold arguments) are what the reward-token probe scores.
    probe = read_json(workdir / "results/textual/iter1/probe/ace/test/probe.json", Probe)
    assert (
        probe.num_problems == 2
        and probe.estimates["good_minus_bad"].ci_low <= probe.estimates["good_minus_bad"].value
    )
