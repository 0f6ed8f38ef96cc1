# pass@k and error types of one policy on one evaluation task set.


rule evaluate:
    input:
        tasks=rules.prepare_tasks.output[0],
        samples=expand(rules.generate.output.samples, purpose="eval", allow_missing=True),
        executions=expand(rules.execute.output.executions, purpose="eval", allow_missing=True),
    output:
        metrics="results/{policy}/eval/{dataset}/{split}/metrics.json",
    params:
        settings=MetricsSettings(k=LETI.evaluate.k).model_dump_json(),
    threads: job_threads("evaluate")
    resources:
        **job_resources("evaluate"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/evaluate/{policy}/{dataset}/{split}.log",
    benchmark:
        "benchmarks/evaluate/{policy}/{dataset}/{split}.tsv"
    shell:
        "leti evaluate --tasks {input.tasks} --samples {input.samples} --executions {input.executions} "
        "--policy {wildcards.policy} --output {output.metrics} --settings {params.settings:q} > {log} 2>&1"
