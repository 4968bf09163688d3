"""Tracing a model: its jaxpr (`trace`), the uses it makes of each weight (`uses`), the rule
table (`table`, `rules/`) and the transform that evaluates the jaxpr with adapters (`transform`:
`lorax.lora`)."""
