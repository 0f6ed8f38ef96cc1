# LoRA fine-tuning: iteration i continues from the adapter of iteration i-1.


rule finetune:
    input:
        model=rules.prepare_model.output[0],
        feedback=rules.build_feedback.output.feedback,
        previous_adapter=previous_adapter,
    output:
        adapter=directory("results/{experiment}/iter{iteration}/adapter"),
        train_log="results/{experiment}/iter{iteration}/train_log.jsonl",
    params:
        previous_adapter=optional_flag("previous_adapter"),
        settings=finetune_settings,
        # Not an output: Snakemake would delete it when the job fails, and it is what a rerun resumes from.
        checkpoints="results/{experiment}/iter{iteration}/checkpoints",
    threads: job_threads("finetune")
    resources:
        **job_resources("finetune"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/finetune/{experiment}/iter{iteration}.log",
    benchmark:
        "benchmarks/finetune/{experiment}/iter{iteration}.tsv"
    shell:
        "leti finetune --model {input.model} {params.previous_adapter} --feedback {input.feedback} "
        "--output {output.adapter} --log {output.train_log} --checkpoint-dir {params.checkpoints} "
        "--settings {params.settings:q} "
        "--threads {threads} > {log} 2>&1"
