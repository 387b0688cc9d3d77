"""Running an export: providers, the session factory, the graph runners, the decode loop, text runners."""
