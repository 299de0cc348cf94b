from kbtune import pipeline


def test_tiny_training_through_pipeline(project):
    cfg = pipeline.compose(project["overrides"])
    val_loss = pipeline.train(cfg)
    assert val_loss is not None and val_loss > 0
