"""The remote half of sagemaker-qlora: the QLoRA training job run inside SageMaker.

This package is shipped to the job as its source directory, so it never imports
`launcher`. `hyperparams` and `progress` import no torch: the launcher uses them.
"""
