"""Build-time stage: fit PatchCore on good images and export the artifact (uses torch)."""
