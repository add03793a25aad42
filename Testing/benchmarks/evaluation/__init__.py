"""Evaluation harness: every registration method on the same real-image cases, one code path for the metrics.

Modules: ``config`` (the tiny / quick / full settings), ``cases`` and ``echo`` (the images, labels and masks),
``methods`` (SSMSR and its ablations, identity) and ``baselines`` (ANTs, elastix, demons), each returning
ITK displacement fields on the fixed grid; ``measure`` (wall time, peak memory), ``metrics`` (Dice, HD95,
Jacobian, MSE, NLCC), ``runner`` (runs it all), ``report`` (results.csv, report.md) and ``figures`` (PNGs).
"""
