# The arm-by-iteration summary, its plots, and the figures of `snakemake --report`.


rule summarize:
    input:
        metrics=all_metrics(),
        train_logs=all_train_logs(),
        probes=all_probes(),
        generation_probes=all_generation_probes(),
    output:
        csv=report("results/summary.csv", category="Summary", caption="report/summary.rst"),
        comparisons=report("results/comparisons.csv", category="Summary", caption="report/comparisons.rst"),
        pass_at_k=report("results/plots/pass_at_k.png", category="Summary", caption="report/pass_at_k.rst"),
        sample_efficiency=report(
            "results/plots/sample_efficiency.png", category="Summary", caption="report/sample_efficiency.rst"
        ),
        error_types=report("results/plots/error_types.png", category="Summary", caption="report/error_types.rst"),
        loss=report("results/plots/training_loss.png", category="Summary", caption="report/training_loss.rst"),
        reward_probe=report(
            "results/plots/reward_probe.png", category="Summary", caption="report/reward_probe.rst"
        ),
    params:
        train_logs=lambda wildcards, input: " ".join(f"--train-log {path}" for path in input.train_logs),
        probes=lambda wildcards, input: " ".join(f"--probe {path}" for path in input.probes),
        generation_probes=lambda wildcards, input: " ".join(
            f"--generation-probe {path}" for path in input.generation_probes
        ),
    threads: job_threads("summarize")
    resources:
        **job_resources("summarize"),
    conda:
        "../envs/leti.yaml"
    log:
        "logs/summarize.log",
    benchmark:
        "benchmarks/summarize.tsv"
    shell:
        "leti summarize {input.metrics} {params.train_logs} {params.probes} {params.generation_probes} "
        "--csv {output.csv} --comparisons {output.comparisons} --pass-at-k-plot {output.pass_at_k} "
        "--sample-efficiency-plot {output.sample_efficiency} --error-types-plot {output.error_types} "
        "--loss-plot {output.loss} --reward-probe-plot {output.reward_probe} > {log} 2>&1"
