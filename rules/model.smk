# The base model as a plain Hugging Face folder, with the LETI reward tokens added.


rule prepare_model:
    output:
        directory("resources/models/base"),
    params:
        settings=LETI.model.model_dump_json(),
    threads: workflow.cores
    conda:
        "../envs/leti.yaml"
    log:
        "logs/prepare_model.log",
    benchmark:
        "benchmarks/prepare_model.tsv"
    shell:
        "leti model prepare --output {output} --settings {params.settings:q} --threads {threads} > {log} 2>&1"
