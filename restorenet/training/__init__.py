"""The trainer's parts (``python -m restorenet.train`` is the command):

    adapters      how each model is fed, trained and scored
    evaluation    held-out sets and their scores per level
    checkpoint    checkpoints, resume state, model files, ``load_model``
    distributed   torchrun / DistributedDataParallel and CPU thread counts
    plot          the loss and held-out score plot
"""
