"""Budget mode does not hold k = round(budget·n) open at eval: nothing enforces it at eval/merge, and
nothing reports the miss (metrics.json records open_directions but neither k nor λ)."""
import sys; sys.path.insert(0, "tests")
from test_ib_gate import train_open_directions
for n in (256, 1024):
    for budget in (0.25, 0.5, 0.75):
        print(f"n_examples={n} ({3 * n // 16} steps) budget={budget}: k={round(12 * budget)}, open at eval="
              f"{train_open_directions(n, budget=budget)} of 12")
