# LETI: generate -> execute -> build feedback -> LoRA fine-tune -> evaluate (and probe), per iteration.
# The rules are thin; every stage is a `leti` subcommand (src/leti/cli.py).

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "rules/report/workflow.rst"


include: "rules/common.smk"
include: "rules/tasks.smk"
include: "rules/model.smk"
include: "rules/generate.smk"
include: "rules/execute.smk"
include: "rules/feedback.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/probe.smk"
include: "rules/summary.smk"


rule all:
    input:
        rules.summarize.output,
    default_target: True
