# Sampling from a policy (base model + LoRA adapter) on a task set.
# purpose "rollouts" feeds the next iteration's training; "eval-{prefix}" feeds the metrics.


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
        "leti generate --model {input.model} {params.adapter} --tasks {input.tasks} "
        "--output {output.samples} --settings {params.settings:q} --threads {threads} > {log} 2>&1"
