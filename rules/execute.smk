# Running every sample with its tests in the sandbox.


rule build_sandbox:
    input:
        unpack(sandbox_sources),
    output:
        record="resources/sandbox/image.json",
        **sandbox_archive_output(),
    params:
        # Only what shapes the image: a new timeout must not rebuild it and rerun every execution.
        settings=LETI.execute.model_dump_json(include={"image", "base_image", "python_image", "debootstrap_suite"}),
    threads: job_threads("build_sandbox")
    resources:
        **job_resources("build_sandbox"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/build_sandbox.log",
    benchmark:
        "benchmarks/build_sandbox.tsv"
    shell:
        # The default's command stays as it was to the letter: Snakemake reruns a job whose shell
        # text changed, and a new image.json would rerun every execute job of a finished run.
        (
            "leti sandbox build --dockerfile {input.dockerfile} --output {output.record} --archive {output.archive} "
            if LETI.execute.image_archive
            else "leti sandbox build --dockerfile {input.dockerfile} --output {output} "
        )
        + "--settings {params.settings:q} > {log} 2>&1"


# One command for all samples of a task set and for one shard of them.
# Not image_archive in the settings: where the image comes from changes no verdict, and a new key in
# this string would change it for every finished run and rerun all its execute jobs.
EXECUTE_SETTINGS = LETI.execute.model_dump_json(exclude={"image_archive"})
EXECUTE = (
    "leti execute --tasks {input.tasks} --samples {input.samples} {params.sandbox} "
    "--output {output.executions} --settings {params.settings:q} --threads {threads} > {log} 2>&1"
)


rule execute:
    input:
        tasks=rules.prepare_tasks.output[0],
        samples=rules.generate.output.samples,
        sandbox=sandbox_image,
        sandbox_archive=sandbox_archive,
    output:
        executions="results/{policy}/{purpose}/{dataset}/{split}/executions.jsonl",
    params:
        sandbox=sandbox_options,
        settings=EXECUTE_SETTINGS,
    threads: job_threads("execute")
    resources:
        **job_resources("execute"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/execute/{policy}/{purpose}/{dataset}/{split}.log",
    benchmark:
        "benchmarks/execute/{policy}/{purpose}/{dataset}/{split}.tsv"
    shell:
        EXECUTE


# Sharded purposes: each shard's samples run in a job of their own, gathered into executions.jsonl.
if sharded_purposes():

    rule execute_shard:
        input:
            tasks=rules.prepare_tasks.output[0],
            samples=rules.generate_shard.output.samples,
            sandbox=sandbox_image,
            sandbox_archive=sandbox_archive,
        output:
            executions=f"{SHARD_FOLDER}/executions.jsonl",
        wildcard_constraints:
            purpose=sharded_purposes(),
        params:
            sandbox=sandbox_options,
            settings=EXECUTE_SETTINGS,
        threads: job_threads("execute")
        resources:
            **job_resources("execute"),
        conda:
            "../envs/leti.yaml"
        log:
            "logs/execute_shard/{policy}/{purpose}/{dataset}/{split}/{scatteritem}.log",
        benchmark:
            "benchmarks/execute_shard/{policy}/{purpose}/{dataset}/{split}/{scatteritem}.tsv"
        shell:
            EXECUTE

    rule gather_executions:
        input:
            tasks=rules.prepare_tasks.output[0],
            shards=shard_files(rules.execute_shard.output.executions),
        output:
            executions=rules.execute.output.executions,
        wildcard_constraints:
            purpose=sharded_purposes(),
        params:
            settings=generation_settings,
        localrule: True
        conda:
            "../envs/leti.yaml"
        log:
            "logs/gather_executions/{policy}/{purpose}/{dataset}/{split}.log",
        benchmark:
            "benchmarks/gather_executions/{policy}/{purpose}/{dataset}/{split}.tsv"
        shell:
            "leti gather {input.shards} --records executions --tasks {input.tasks} "
            "--settings {params.settings:q} --output {output.executions} > {log} 2>&1"

    ruleorder: gather_executions > execute
