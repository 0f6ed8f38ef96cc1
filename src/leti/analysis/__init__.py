"""Reading results: summary tables, statistics, paired comparisons, plots, diagnosis and reports."""
