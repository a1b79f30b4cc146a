"""The process side: engine descriptions, processes, supervisors and the pool. Knows nothing of HTTP serving."""
