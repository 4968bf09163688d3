"""The model and support code the examples, tests and benchmarks share.

A GPT with its training workload (`gpt`), a LLaMA-family decoder laid out like transformers'
(`llama`, with its products in `products` and its head's fused loss in `xent`) and the SmolLM2
checkpoint read from its GGUF file (`smollm`), all-MiniLM-L6-v2 (`minilm`), KV-cache generation
(`generate`), the Shakespeare thou/you task (`plays`) and matmul flops counted from a jaxpr
(`flops`). The runnable scripts in ``examples/`` import it as ``from lorax_examples import
llama``: Python puts a script's folder on ``sys.path``. From the repository root, put
``examples`` on the path: ``PYTHONPATH=examples python3 -m lorax_examples.smollm``.
"""
