"""The continual method, registry-free: a LayerNormBank (per-task norm slots routed by task keys), its training
(keys, slots, head rectification and classifier alignment), Fisher-selected subsets, the pipeline's model and head,
task data and the continual-learning metrics. A Python user trains and routes a bank with these alone;
splice.workflows.continual runs them as a pipeline over a registry (run, resume, predict, report)."""
