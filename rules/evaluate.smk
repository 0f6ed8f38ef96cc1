# pass@k, error types and their CIs of one policy's samples on one task set: an evaluation
# (purpose eval-{prefix}) or the policy's own rollouts (purpose rollouts).


rule evaluate:
    input:
        tasks=rules.prepare_tasks.output[0],
        samples=rules.generate.output.samples,
        executions=rules.execute.output.executions,
    output:
        metrics="results/{policy}/{purpose}/{dataset}/{split}/metrics.json",
    params:
        settings=metrics_settings,
    threads: job_threads("evaluate")
    resources:
        **job_resources("evaluate"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/evaluate/{policy}/{purpose}/{dataset}/{split}.log",
    benchmark:
        "benchmarks/evaluate/{policy}/{purpose}/{dataset}/{split}.tsv"
    shell:
        "leti evaluate --tasks {input.tasks} --samples {input.samples} --executions {input.executions} "
        "--policy {wildcards.policy} --output {output.metrics} --settings {params.settings:q} > {log} 2>&1"
