"""What operators read: metrics, logs and GPU readings.

Modules, one concept each::

    metrics    Prometheus metrics in an app-owned registry, and the merge of workers' expositions
    log_setup  logging configured once by the command line; the request id on every line
    gpu_probe  GPUs as NVML sees them, cached, with the reason when NVML is absent
"""
