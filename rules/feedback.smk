# LETI training texts for iteration i, from the rollouts of policy i-1.


rule build_feedback:
    input:
        unpack(rollout_artifacts),
        tasks=rules.prepare_tasks.output[0].format(**split_task_set(LETI.generate.tasks)),
        model=rules.prepare_model.output[0],
    output:
        feedback="results/{experiment}/iter{iteration}/feedback.jsonl",
    params:
        samples=optional_flag("samples"),
        executions=optional_flag("executions"),
        settings=feedback_settings,
    threads: job_threads("build_feedback")
    resources:
        **job_resources("build_feedback"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/build_feedback/{experiment}/iter{iteration}.log",
    benchmark:
        "benchmarks/build_feedback/{experiment}/iter{iteration}.tsv"
    shell:
        "leti feedback --tasks {input.tasks} {params.samples} {params.executions} --model {input.model} "
        "--output {output.feedback} --settings {params.settings:q} > {log} 2>&1"
