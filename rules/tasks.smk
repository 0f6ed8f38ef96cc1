# Problem sets: MBPP and GENEVA (local or downloaded), HumanEval (from its package), custom JSONL,
# custom event argument extraction data (OneIE JSONL + ontology).


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


# GENEVA (Parekh et al., ACL 2023; CC BY 3.0) at its pinned commit, every file checked by sha256.
rule download_geneva:
    output:
        [f"{GENEVA_DOWNLOAD_DIR}/{path}" for path in GENEVA_SHA256],
    params:
        folder=geneva_download_folder,
    threads: job_threads("download_geneva")
    resources:
        **job_resources("download_geneva"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/download_geneva.log",
    benchmark:
        "benchmarks/download_geneva.tsv"
    shell:
        "leti tasks download-geneva --output {params.folder} > {log} 2>&1"


rule prepare_tasks:
    input:
        source=task_source,
        ontology=task_ontology,
        # Which shipped problems run their tests in the program's process (docs/sandbox.md#isolation).
        in_process=f"{workflow.basedir}/src/leti/tasks/in_process.json",
    output:
        "resources/tasks/{dataset}/{split}.jsonl",
    params:
        source=optional_flag("source"),
        ontology=optional_flag("ontology"),
        strict=strict_option,
        limit=limit_option,
        # The departures from the reference (data.extra_stop_sequences, data.strip_own_tests).
        stops=departure_options,
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
        "{params.source} {params.ontology} {params.strict} {params.limit} {params.stops} --output {output} > {log} 2>&1"
