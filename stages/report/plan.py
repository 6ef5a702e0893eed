"""The report's plan section: for each architecture and workload of data/plan/plans.json, each
device's answer (does it fit, with which stack, at what per-rank peak and cost)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.common.core.artifacts import read_json
from stages.report.document import Doc, num


def read_plans(folder: Path) -> list[dict[str, Any]]:
    path = folder / "plans.json"
    return read_json(path) if path.is_file() else []


def section(doc: Doc, plans: list[dict[str, Any]]) -> None:
    if not plans:
        return
    doc.heading(2, "Plan: will it fit, and with which stack")
    doc.para("Each architecture dry-run at its real size on fake tensors (python -m stages.plan), per rank; "
             f"a device fits a stack when its peak plus {num(plans[0]['reserve_mib'], 0)} MiB held back is "
             "at most its memory. Cost: " + plans[0]["cost_source"] + ".")
    rows = []
    for plan in plans:
        q = plan["question"]
        shape = f"{q['batch_size']} x {q['context']}" + (f", micro {q['micro_batch_size']}"
                                                         if q["workload"] != "inference"
                                                         else f", prompt {q['prompt']}")
        for device, answer in plan["devices"].items():
            best = answer["stacks"][0] if answer["stacks"] else None
            rows.append([q["architecture"], q["workload"], shape,
                         f"{device} ({num(answer['device_mib'] / 1024, 0)} GiB)",
                         "yes" if best else "no", best["stack"] if best else
                         ("cannot fit: the weights alone overflow it" if "cannot_fit" in answer
                          else "nothing tried fits"),
                         num(best["peak_mib"]) if best else "–", f"{best['cost']:.2f}" if best else "–",
                         str(len(answer["stacks"])) + "/" + str(len(plan["tried"]))])
    doc.table(["architecture", "workload", "batch x context", "device", "fits", "cheapest stack that fits",
               "per-rank peak MiB", "cost", "stacks fitting / tried"], rows)
    compared = [[p["question"]["architecture"], p["question"]["workload"], num(asked["peak_mib"]),
                 num(asked["category_peaks"].get("activations")), num(p["others"]["accelerate_training_mib"]),
                 num(p["others"]["korthikanti_activations_mib"])]
                for p in plans if p.get("others") and (asked := p["tried"][0])["stack"] == "as asked"]
    if compared:
        doc.para("The asked stack beside what others estimate for it (MiB): accelerate's estimate-memory "
                 "('Training using Adam': the largest of its figures, weights, gradients and optimizer "
                 "state only) and the activations of Korthikanti et al. (2022) (16-bit, attention scores "
                 "stored, the blocks only); docs/BENCHMARKS.md gives the reasons for each difference, and "
                 "DeepSpeed's ZeRO-2 and ZeRO-3 estimates beside them (DeepSpeed is not in the lock: it "
                 "patches torch as it is imported).")
        doc.table(["architecture", "workload", "lmmem peak", "lmmem activations", "accelerate",
                   ("Korthikanti et al. "
                    "activations")], compared)
    counts = {p["question"]["architecture"]: (p["parameters"], p.get("published_parameters")) for p in plans}
    doc.table(["architecture", "parameters built", "published"],
              [[a, f"{n:,}", f"{pub:,}" if pub else "–"] for a, (n, pub) in counts.items()])
