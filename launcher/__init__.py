"""userloop's launcher: validate a run config, run the trainer locally, render and submit it to Kubernetes.

Never imports torch, transformers, peft, accelerate or litellm (a test checks it in a fresh interpreter).
"""
