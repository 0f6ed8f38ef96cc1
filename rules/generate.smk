# Sampling from a policy (base model + LoRA adapter) on a task set.
# purpose "rollouts" feeds the next iteration's training; "eval-{prefix}" feeds the metrics.

# One command for a whole task set and for one shard of it.
GENERATE = (
    "leti generate --model {input.model} {params.adapter} --tasks {input.tasks} "
    "--output {output.samples} --settings {params.settings:q} --threads {threads}"
)


rule generate:
    input:
        model=rules.prepare_model.output[0],
        adapter=policy_adapter,
        tasks=rules.prepare_tasks.output[0],
    output:
        samples="results/{policy}/{purpose}/{dataset}/{split}/samples.jsonl",
    params:
        adapter=optional_flag("adapter"),
        settings=generation_settings,
    threads: job_threads("generate")
    resources:
        **job_resources("generate"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/generate/{policy}/{purpose}/{dataset}/{split}.log",
    benchmark:
        "benchmarks/generate/{policy}/{purpose}/{dataset}/{split}.tsv"
    shell:
        f"{GENERATE} > {{log}} 2>&1"


# Sharded purposes (generate.shards, evaluate.shards > 1): one job per shard, each a contiguous slice
# of the requests, and a gather into the samples.jsonl that `generate` would have written.
if sharded_purposes():

    rule generate_shard:
        input:
            model=rules.prepare_model.output[0],
            adapter=policy_adapter,
            tasks=rules.prepare_tasks.output[0],
        output:
            samples=f"{SHARD_FOLDER}/samples.jsonl",
        wildcard_constraints:
            purpose=sharded_purposes(),
        params:
            adapter=optional_flag("adapter"),
            settings=generation_settings,
        threads: job_threads("generate")
        resources:
            **job_resources("generate"),
        conda:
            "../envs/leti.yaml"
        log:
            "logs/generate_shard/{policy}/{purpose}/{dataset}/{split}/{scatteritem}.log",
        benchmark:
            "benchmarks/generate_shard/{policy}/{purpose}/{dataset}/{split}/{scatteritem}.tsv"
        shell:
            f"{GENERATE} --shard {{wildcards.scatteritem}} > {{log}} 2>&1"

    rule gather_samples:
        input:
            tasks=rules.prepare_tasks.output[0],
            shards=shard_files(rules.generate_shard.output.samples),
        output:
            samples=rules.generate.output.samples,
        wildcard_constraints:
            purpose=sharded_purposes(),
        params:
            settings=generation_settings,
        localrule: True
        conda:
            "../envs/leti.yaml"
        log:
            "logs/gather_samples/{policy}/{purpose}/{dataset}/{split}.log",
        benchmark:
            "benchmarks/gather_samples/{policy}/{purpose}/{dataset}/{split}.tsv"
        shell:
            "leti gather {input.shards} --records samples --tasks {input.tasks} "
            "--settings {params.settings:q} --output {output.samples} > {log} 2>&1"

    ruleorder: gather_samples > generate
