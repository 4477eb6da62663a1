"""moat inside other libraries: timm (`timm_registry.py` registers every variant and release;
`timm_hook.py` imports it as soon as timm is imported, so `import moat` stays free of timm).
Nothing is imported here."""
