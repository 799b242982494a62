"""This package's engine under other libraries' models.

`keras_moe.integrations.keras_hub`: `sparsify(model)` makes keras-hub's
dense-experts MoE blocks compute only the chosen experts (needs the
`keras-hub` extra: `pip install keras-moe[keras-hub]`).
"""
