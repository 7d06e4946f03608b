"""The project's tools, kept apart from the frame path: benchmarks, the GPU check, the demo, a local broker."""
