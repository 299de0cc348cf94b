from kbtune.hydra_entry import compose
from kbtune.jobs import train


def test_tiny_training_through_pipeline(project):
    cfg = compose(project["overrides"])
    val_loss = train(cfg)
    assert val_loss is not None and val_loss > 0
