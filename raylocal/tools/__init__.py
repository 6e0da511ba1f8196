"""Tools around runs: network namespaces, the GPU check, pictures from a run."""
