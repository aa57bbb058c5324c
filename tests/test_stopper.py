from tune_alexnet.stopper import plateau_update, result_says_stop
from tune_alexnet.sweep import PlateauStopper


def results_for(accuracies):
    """What the training function reports for a sequence of per-epoch validation accuracies."""
    best, since = -1.0, 0
    out = []
    for epoch, acc in enumerate(accuracies, start=1):
        best, since, _ = plateau_update(best, since, acc)
        out.append({"epoch": epoch, "val_acc": acc, "best_val_acc": best, "epochs_since_best": since})
    return out


def stopping_epoch(accuracies, **kw):
    stopper = PlateauStopper(**kw)
    for result in results_for(accuracies):
        if stopper("t", result):
            return result["epoch"]
    return None


def test_stops_after_patience_epochs_without_a_new_best():
    assert stopping_epoch([10, 20, 30, 25, 26, 27, 28, 29, 40], patience=5) == 8
    assert stopping_epoch([10, 20, 30, 25, 26, 27, 28, 31, 20, 20], patience=5) is None


def test_a_tie_is_not_an_improvement():
    assert stopping_epoch([50, 50, 50, 50, 50, 50], patience=5) == 6


def test_a_new_best_resets_the_counter():
    seq = [10, 9, 9, 9, 9, 11, 9, 9, 9, 9, 9]
    assert stopping_epoch(seq, patience=5) == 11
    assert stopping_epoch(seq, patience=3) == 4


def test_max_epochs_stops_a_run_that_keeps_improving():
    assert stopping_epoch(list(range(1, 20)), patience=5, max_epochs=7) == 7


def test_repeated_final_call_with_done_does_not_count_as_an_epoch():
    stopper = PlateauStopper(patience=2, max_epochs=100)
    results = results_for([10, 20, 15])
    assert not any(stopper("t", r) for r in results)
    # Tune feeds the last result once more with done=True after the function returns.
    assert not stopper("t", {**results[-1], "done": True})
    assert not stopper("t", {**results[-1], "done": True})


def test_trials_are_independent_and_a_diverged_result_stops():
    stopper = PlateauStopper(patience=1)
    a = results_for([10, 5])
    b = results_for([10, 20])
    assert stopper("a", a[1]) and not stopper("b", b[1])
    assert stopper("c", {"epoch": 2, "val_acc": 10, "epochs_since_best": 0, "diverged": True})


def test_results_without_an_epoch_are_ignored():
    assert not PlateauStopper()("t", {"training_iteration": 3})


def test_the_stopper_and_the_training_function_end_a_run_at_the_same_epoch(synthetic_dir):
    """The function ends itself by the rule, on the report the rule says; the stopper agrees and lets the function end it."""
    from tune_alexnet.data import load_cifar10, take_subset
    from tune_alexnet.train import train_cifar

    data = take_subset(load_cifar10(synthetic_dir, progress=False), 4)
    for config in ({"lr": 1e-9, "patience": 2, "epochs": 50}, {"lr": 0.01, "patience": 50, "epochs": 4}):
        reports = []
        train_cifar(
            {"optimizer": "sgd", "batch_size": 16, "dropout": False, "batchnorm": True, "width": 0.125, **config},
            data,
            lambda metrics, checkpoint_dir, reports=reports: reports.append(metrics),
        )
        rule = [result_says_stop(r, config["patience"], config["epochs"]) for r in reports]
        assert rule == [False] * (len(reports) - 1) + [True], rule  # the function ended where the rule says
        assert [r["ends_trial"] for r in reports] == rule  # and said so on that report
        stopper = PlateauStopper(patience=config["patience"], max_epochs=config["epochs"])
        assert not any(stopper("t", r) for r in reports)  # so the stopper never tears a trial down from outside
        # ... but stops a trial that goes past the rule (one that did not end itself).
        assert stopper("t", {**reports[-1], "ends_trial": False, "epoch": reports[-1]["epoch"] + 1})
    assert len(reports) == 4  # the second run ran to its epoch limit


def test_a_trial_that_held_back_a_checkpoint_for_want_of_room_is_left_to_the_sweeps_stop():
    from tune_alexnet.ray_hooks import STORAGE_FULL

    past_the_rule = results_for([50, 40, 40, 40, 40, 40])[-1]  # the plateau rule says stop
    assert PlateauStopper(patience=5)("t", past_the_rule)
    # Stopped by the rule, Tune would mark it finished without its final checkpoint; the disk guard stops the
    # whole sweep instead, and --resume replays it from its last resume state.
    assert not PlateauStopper(patience=5)("t", {**past_the_rule, STORAGE_FULL: 5_000_000})
