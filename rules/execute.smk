# Running every sample with its tests in the sandbox.


rule build_sandbox:
    output:
        "resources/sandbox/image.json",
    conda:
        "../envs/leti.yaml"
    log:
        "logs/build_sandbox.log",
    benchmark:
        "benchmarks/build_sandbox.tsv"
    shell:
        "leti sandbox build --output {output} > {log} 2>&1"


rule execute:
    input:
        tasks=rules.prepare_tasks.output[0],
        samples=rules.generate.output.samples,
        sandbox=sandbox_image,
    output:
        executions="results/{policy}/{purpose}/{dataset}/{split}/executions.jsonl",
    params:
        settings=LETI.execute.model_dump_json(),
    threads: workflow.cores
    conda:
        "../envs/leti.yaml"
    log:
        "logs/execute/{policy}/{purpose}/{dataset}/{split}.log",
    benchmark:
        "benchmarks/execute/{policy}/{purpose}/{dataset}/{split}.tsv"
    shell:
        "leti execute --tasks {input.tasks} --samples {input.samples} --output {output.executions} "
        "--settings {params.settings:q} --threads {threads} > {log} 2>&1"
