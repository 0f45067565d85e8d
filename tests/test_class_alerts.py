"""Issue 4 end to end: a simulated class whose faces are forced to look confused; the teacher's
socket gets student and class alerts within 2 s of the condition holding, students get none, and the
review API and CSV show the session."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from tests.spine import PROJECT, VIDEOS

pytestmark = pytest.mark.skipif(not VIDEOS.exists(), reason=f"{VIDEOS} not found: the shared media folder is absent")


def test_forced_confusion_reaches_the_teacher_only_and_is_reviewable(tmp_path):
    db = tmp_path / "class.sqlite"
    cmd = [sys.executable, "-m", "bot.simulate", "--students", "4", "--no-face-students", "1", "--seconds", "14",
           "--video", str(VIDEOS / "woman2.mp4"), "--db", str(db), "--pattern", "confused", "--json",
           "--bot-arg=--signals-window-seconds=4", "--bot-arg=--signals-student-min-seconds=3",
           "--bot-arg=--signals-class-min-seconds=3", "--bot-arg=--signals-min-samples=3"]
    result = subprocess.run(cmd, cwd=PROJECT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["errors"] == 0 and summary["rows_lost"] == 0
    assert summary["frames_shed_before_decoding"] == 0 and summary["frames_undecodable"] == 0
    kinds = set(summary["alert_kinds"])
    assert "student:confusion" in kinds and "class:confusion" in kinds
    assert summary["alerts_received_by_teacher"] == summary["alerts"]
    assert summary["alert_latency_s"] is not None and summary["alert_latency_s"] <= 2.0
    assert summary["students_received_teacher_data"] == []
    # Where the time went: the inference process ran (the scripted pattern still detects faces) and the
    # machine and the harness were measured over the window.
    breakdown = summary["time_breakdown"]
    assert breakdown["cores"] >= 1 and breakdown["inference_child_ms_per_frame"] > 0
    assert breakdown["machine_busy_percent"] > 0 and breakdown["harness_cpu_percent"] > 0
    assert "bottleneck" in breakdown and "short_of_target" in summary
    # The no-face student (synthetic track) is never called confused: no face, no expression.
    con = sqlite3.connect(db)
    no_face = con.execute("SELECT name FROM participants WHERE participant_id IN "
                          "(SELECT participant_id FROM samples GROUP BY participant_id HAVING SUM(face_found) = 0)").fetchall()
    alerted = {r[0] for r in con.execute("SELECT name FROM alerts WHERE level = 'student' AND kind = 'confusion'")}
    con.close()
    assert no_face and not ({n for (n,) in no_face} & alerted)

    out = tmp_path / "export"
    export = subprocess.run([sys.executable, "-m", "storage.export", "--db", str(db), "--session",
                             summary["session_id"], "--out", str(out)], cwd=PROJECT, capture_output=True, text=True)
    assert export.returncode == 0, export.stderr
    alerts_csv = (out / "alerts.csv").read_text().splitlines()
    assert len(alerts_csv) == summary["alerts"] + 1 and "seems confused" in alerts_csv[1] + "".join(alerts_csv)
    review = json.loads((out / "review.json").read_text())
    assert len(review["students"]) == 4 and review["alerts"] and review["timeline"]
    confused = [s for s in review["students"] if s["mean_confusion"] is not None and s["mean_confusion"] > 0.5]
    assert len(confused) == 3
