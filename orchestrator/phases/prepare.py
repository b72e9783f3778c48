"""prepare: green table, copied grants, forward dual-write triggers; one transaction."""

from __future__ import annotations

import json

from orchestrator.executor import Statement, Unit
from orchestrator.journal import journal_unit, spec_to_json
from orchestrator.phases.keys import green_of
from orchestrator.plan import Plan
from orchestrator.render import render_steps
from orchestrator.spec import MigrationSpec, forward_sync
from orchestrator.surroundings import TableProperties


def prepare_units(plan: Plan, spec: MigrationSpec, current_user: str, plan_text: str | None = None,
                  properties: TableProperties | None = None) -> list[Unit]:
    """The journal, green, the triggers and the journal row in one transaction under lock_timeout
    retries: a prepare that fails or is killed leaves nothing behind. `plan_text`, the plan file as
    its author wrote it, is recorded for `bgsync plan show`."""

    # one grant of sequence usage per role that may insert or update blue
    sequence_grantees = list(dict.fromkeys(g for g, privilege, _ in spec.grants if privilege in ("INSERT", "UPDATE")))
    statements = list(journal_unit(spec.state_schema).statements)
    statements += [Statement(d, s) for d, s in render_steps(
        "prepare.sql.j2", spec=spec, current_user=current_user, sync=forward_sync(spec), title="forward sync",
        sequence_grantees=sequence_grantees, props=properties or TableProperties(), green_of=green_of(spec),
        sync_log=spec.log_table if spec.bulk else None)]
    statements += [Statement(d, s + "\nRETURNING name",
                             expect_rows=f"migration {spec.name} is already registered and active; see `bgsync status`")
                   for d, s in render_steps(
        "migration_register.sql.j2", schema=spec.state_schema, name=spec.name, source=str(spec.blue),
        target=str(spec.green), plan_hash=spec.plan_hash,
        plan_json=json.dumps(plan.structural_dump(), sort_keys=True), spec_json=spec_to_json(spec),
        plan_text=plan_text)]
    main = Unit(f"prepare {spec.name}: green {spec.green} and forward triggers on {spec.blue}", statements,
                lock_timeout=plan.cutover.lock_timeout, attempts=plan.cutover.attempts, phase="prepare")
    return [main]
