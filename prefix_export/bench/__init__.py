"""`prefix-export bench`: probes, backends on the shared decode loop, variants, the run, the report."""
