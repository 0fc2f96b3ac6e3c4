from django.db import NotSupportedError, connections, models
from django.db.models.signals import post_save
from django.db.models.sql import UpdateQuery
from django.utils import timezone

from servers.models import Server
from tasks.fields import JSONField

# Each event kind as its owner reads it on the task's page ({server}: the server's name, which users may see).
# Staff see the kind itself beside it. A kind not listed here reads as its own words ("some_kind": "Some kind").
SENTENCES = {
    "created": "Added to the queue",
    "submitted": "Sent to {server}",
    "resubmitted": "Sent to {server} again",
    "accepted": "Waiting in {server}'s queue",
    "running": "Started on {server}",
    "succeeded": "Finished",
    "failed": "Failed",
    "cancel_requested": "Cancel requested",
    "cancel_sent": "{server} was asked to stop it",
    "cancelled": "Cancelled",
    "unbound": "Taken back before {server} received it",
    "requeued": "Back in the queue after {server} lost it",
    "moved": "Moved away from {server}, which is unavailable",
    "retried": "Sent back to the queue by an operator",
    "handed_over": "Handed over to another hub worker",
    "reply_lost": "{server} did not confirm it received it; checking its queue",
    "partial": "{server} refused some of its outputs",
    "step_failed": "A step in the hub failed; it will be tried again",
    "recover_resync": "Seemed stuck; checked with {server} again",
    "recover_refetch": "Seemed stuck; fetched its result from {server} again",
    "recover_requeue": "Seemed stuck; sent again",
    "recover_fail": "Still stuck after every attempt to recover it",
    "stale_deleted": "An earlier copy was deleted from {server}",
    "stale_interrupted": "An earlier copy ran on {server} anyway",
    "late_result_ignored": "{server} finished an earlier copy; that result is ignored",
    "outputs_removed": "Its results were removed from storage (retention)",
}
# Kinds whose message is the reason, worth reading after the sentence (failures have theirs shown once, above).
WITH_REASON = ("unbound", "requeued", "moved")


class TaskEvent(models.Model):
    """Append-only trail: every transition, reconnect and reconciliation of a task, with the server involved."""

    task = models.ForeignKey("tasks.Task", on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now, db_index=True)
    kind = models.CharField(max_length=40, db_index=True)
    from_status = models.CharField(max_length=16, blank=True)
    to_status = models.CharField(max_length=16, blank=True)
    server = models.ForeignKey(Server, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    prompt_id = models.CharField(max_length=64, blank=True)
    message = models.TextField(blank=True)
    detail = JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["at", "pk"]

    def __str__(self):
        return f"{self.kind} {self.from_status}→{self.to_status}"

    @property
    def sentence(self):
        """What happened, in plain words for the task's owner: no internal names (the message must be fit to show)."""
        template = SENTENCES.get(self.kind)
        if template is None:
            return self.kind.replace("_", " ").strip().capitalize() or "Something happened"
        text = template.format(server=self.server.name if self.server_id and self.server else "a server")
        if self.kind in WITH_REASON and self.message:
            text = f"{text}: {self.message}"
        return text[0].upper() + text[1:]


def update_and_record(rows, changes, event, *, returning=False):
    """
    The conditional UPDATE of a transition (`changes` to the one row of `rows`) and, when it won, the INSERT of its
    `event` (an unsaved TaskEvent without its task): True when it won. On PostgreSQL both are one statement (a
    data-modifying WITH), so a transition costs one round trip and no transaction of its own; elsewhere they are
    two, in the caller's transaction. `returning` (PostgreSQL only): the row as it is after the UPDATE, a model
    instance, or None when it lost.
    """
    connection = connections[rows.db]
    if connection.vendor != "postgresql":
        if returning:
            raise NotSupportedError("update_and_record(returning=True) needs PostgreSQL")
        if rows.update(**changes) != 1:
            return False
        event.save(using=rows.db)
        return True
    query = rows.query.chain(UpdateQuery)
    query.add_update_values(changes)
    compiler = query.get_compiler(rows.db)
    compiler.pre_sql_setup()
    update_sql, update_params = compiler.as_sql()
    fields = [field for field in TaskEvent._meta.concrete_fields if not field.primary_key and field.name != "task"]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(field.column) for field in fields)
    values = [field.get_db_prep_save(field.pre_save(event, add=True), connection) for field in fields]
    table, task_table, pk = quote(TaskEvent._meta.db_table), quote(rows.model._meta.db_table), quote("id")
    # Only quoted names and Django's own compiled UPDATE are put in the text; every value is a parameter.
    marks = ", ".join(["%s"] * len(fields))
    statement = " ".join((
        f"WITH moved AS ({update_sql} RETURNING {task_table}.*),",
        f"recorded AS (INSERT INTO {table} ({quote('task_id')}, {columns})",
        f"SELECT moved.{pk}, {marks} FROM moved RETURNING {table}.{pk})",  # noqa: S608
        f"SELECT (SELECT {pk} FROM recorded), moved.* FROM moved",  # noqa: S608
    ))
    with connection.cursor() as cursor:
        cursor.execute(statement, (*update_params, *values))
        row = cursor.fetchone()
        names = [column.name for column in cursor.description[1:]]
    if row is None:
        return None if returning else False
    event.pk = row[0]
    event._state.adding, event._state.db = False, rows.db
    post_save.send(sender=TaskEvent, instance=event, created=True, update_fields=None, raw=False, using=rows.db)
    return _instance(rows, connection, names, row[1:]) if returning else True


def _instance(rows, connection, columns, values):
    """A model instance of `rows`' model from its table's columns, in any order, as the database returned them."""
    found = dict(zip(columns, values, strict=True))
    fields = rows.model._meta.concrete_fields  # Model.from_db wants the values in this order
    converted = [
        field.from_db_value(found[field.column], None, connection)
        if hasattr(field, "from_db_value")
        else found[field.column]
        for field in fields
    ]
    return rows.model.from_db(rows.db, [field.attname for field in fields], converted)
