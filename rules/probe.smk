# The reward-token probe: each reference solution's likelihood after <|good|> and after <|bad|>,
# teacher-forced, under every policy (src/leti/probe.py). No generation: minutes per policy.


rule probe:
    input:
        model=rules.prepare_model.output[0],
        adapter=policy_adapter,
        tasks=rules.prepare_tasks.output[0],
    output:
        probe="results/{policy}/probe/{dataset}/{split}/probe.json",
    params:
        adapter=optional_flag("adapter"),
        settings=LETI.probe_settings().model_dump_json(),
    # Cheap and the most sensitive measure: it runs before the evaluations waiting beside it.
    priority: 1
    threads: job_threads("probe")
    resources:
        **job_resources("probe"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/probe/{policy}/{dataset}/{split}.log",
    benchmark:
        "benchmarks/probe/{policy}/{dataset}/{split}.tsv"
    shell:
        "leti probe --model {input.model} {params.adapter} --tasks {input.tasks} --policy {wildcards.policy} "
        "--output {output.probe} --settings {params.settings:q} --threads {threads} > {log} 2>&1"


# The same reference solutions after <|good|> only, under the policy exactly as `leti generate` loads it
# (the evaluation's generation settings: its dtype, its adapter merged). Beside the float32 probe, how
# much of each update's shift the generating policy keeps (docs/evaluation.md).
rule probe_generation:
    input:
        model=rules.prepare_model.output[0],
        adapter=policy_adapter,
        tasks=rules.prepare_tasks.output[0],
    output:
        probe="results/{policy}/probe/{dataset}/{split}/generation.json",
    params:
        adapter=optional_flag("adapter"),
        settings=generation_probe_settings,
    threads: job_threads("probe_generation")
    resources:
        **job_resources("probe_generation"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/probe_generation/{policy}/{dataset}/{split}.log",
    benchmark:
        "benchmarks/probe_generation/{policy}/{dataset}/{split}.tsv"
    shell:
        "leti probe --as-generated --model {input.model} {params.adapter} --tasks {input.tasks} "
        "--policy {wildcards.policy} --output {output.probe} --settings {params.settings:q} "
        "--threads {threads} > {log} 2>&1"
