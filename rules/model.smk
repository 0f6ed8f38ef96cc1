# The base model as a plain Hugging Face folder, with the LETI reward tokens added.


rule prepare_model:
    input:
        source=model_source,
    output:
        directory("resources/models/base"),
    params:
        # Only the source shapes the folder; model.dtype is applied when a policy runs.
        settings=LETI.model.model_dump_json(include={"source"}),
    threads: job_threads("prepare_model")
    resources:
        **job_resources("prepare_model"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/prepare_model.log",
    benchmark:
        "benchmarks/prepare_model.tsv"
    shell:
        "leti model prepare --output {output} --settings {params.settings:q} --threads {threads} > {log} 2>&1"
