# Problem sets: MBPP (local or downloaded), HumanEval (from its package), custom JSONL.


rule download_mbpp:
    output:
        "resources/data/mbpp.jsonl",
    threads: job_threads("download_mbpp")
    resources:
        **job_resources("download_mbpp"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/download_mbpp.log",
    benchmark:
        "benchmarks/download_mbpp.tsv"
    shell:
        "leti tasks download-mbpp --output {output} > {log} 2>&1"


rule prepare_tasks:
    input:
        source=task_source,
    output:
        "resources/tasks/{dataset}/{split}.jsonl",
    params:
        source=optional_flag("source"),
        limit=limit_option,
    threads: job_threads("prepare_tasks")
    resources:
        **job_resources("prepare_tasks"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/prepare_tasks/{dataset}/{split}.log",
    benchmark:
        "benchmarks/prepare_tasks/{dataset}/{split}.tsv"
    shell:
        "leti tasks prepare --dataset {wildcards.dataset} --split {wildcards.split} "
        "{params.source} {params.limit} --output {output} > {log} 2>&1"
