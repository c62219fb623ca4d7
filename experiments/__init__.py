"""
Our studies, apart from the reference: the harness that reruns every results table (`reproduce`),
accuracy-cost points and Patch Ranking's table (`points`), the video probes and tables (`video`).
Anything here may import anything of the project; nothing of the project imports it.
"""
