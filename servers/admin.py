from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.db.models import Count, Q

from servers.comfy import ComfyError
from servers.connection import standalone
from servers.consistency import check
from servers.models import Lock, Server, ServerEvent, StalePrompt


class ServerEventInline(admin.TabularInline):
    model = ServerEvent
    extra = 0
    can_delete = False
    fields = ["at", "kind", "from_state", "to_state", "message"]
    readonly_fields = fields
    ordering = ["-at", "-pk"]

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Server)
class ServerAdmin(admin.ModelAdmin):
    list_display = [
        "name", "base_url", "enabled", "draining", "state", "state_reason", "in_flight", "waiting", "weight",
        "pipeline_depth", "max_in_flight", "foreign_queue", "last_seen", "last_error",
    ]
    list_filter = ["enabled", "draining", "state"]
    search_fields = ["name", "base_url"]
    readonly_fields = [
        "state", "state_reason", "state_changed_at", "client_id", "last_seen", "last_error", "foreign_queue",
        "fingerprint", "last_probe_at", "capabilities_at", "comfyui_version", "created_at",
    ]
    exclude = ["capabilities"]
    inlines = [ServerEventInline]
    actions = ["drain", "undrain", "enable", "disable", "probe_now", "consistency_check", "consistency_fix"]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                running_count=Count("tasks", filter=Q(tasks__status="running")),
                waiting_count=Count("tasks", filter=Q(tasks__status="submitted")),
            )
        )

    @admin.display(description="running", ordering="running_count")
    def in_flight(self, server):
        return server.running_count

    @admin.display(description="queued there", ordering="waiting_count")
    def waiting(self, server):
        return server.waiting_count

    @admin.action(description="Probe now (/system_stats, /queue, /object_info)")
    def probe_now(self, request, queryset):
        async def probe(server):
            conn = standalone(server)
            conn.online = server.state in ("online", "degraded", "draining")
            try:
                await conn.probe()
            finally:
                await conn.client.close()


        for server in queryset:
            try:
                async_to_sync(probe)(server)
            except ComfyError as exc:
                self.message_user(request, f"Server {server.name}: no answer: {exc.message}", messages.ERROR)
            else:
                server.refresh_from_db()
                self.message_user(
                    request,
                    f"Server {server.name} answers; {server.foreign_queue} prompt(s) of other clients queued; "
                    f"{len((server.capabilities or {}).get('classes', {}))} node types.",
                    messages.SUCCESS,
                )

    @admin.action(description="Consistency check (report only)")
    def consistency_check(self, request, queryset):
        self._consistency(request, queryset, fix=False)

    @admin.action(description="Consistency check and repair")
    def consistency_fix(self, request, queryset):
        self._consistency(request, queryset, fix=True)

    def _consistency(self, request, queryset, fix):

        for server in queryset:
            findings = async_to_sync(check)(standalone, server.name, fix)
            if not findings:
                self.message_user(request, f"Server {server.name} is consistent: nothing found.", messages.SUCCESS)
            for finding in findings:
                level = messages.SUCCESS if finding.action and not finding.action.startswith("cannot") else (
                    messages.WARNING
                )
                self.message_user(request, str(finding), level)

    @admin.action(description="Drain: take no new work, finish what they have")
    def drain(self, request, queryset):
        count = queryset.update(draining=True)
        self.message_user(request, f"{count} server(s) draining: no new work goes to them.", messages.SUCCESS)

    @admin.action(description="Stop draining: take new work again")
    def undrain(self, request, queryset):
        count = queryset.update(draining=False)
        self.message_user(request, f"{count} server(s) take new work again.", messages.SUCCESS)

    @admin.action(description="Enable")
    def enable(self, request, queryset):
        count = queryset.update(enabled=True)
        self.message_user(request, f"{count} server(s) enabled.", messages.SUCCESS)

    @admin.action(description="Disable (its socket closes; tasks on it are followed up when it is enabled again)")
    def disable(self, request, queryset):
        count = queryset.update(enabled=False)
        self.message_user(request, f"{count} server(s) disabled.", messages.SUCCESS)


@admin.register(Lock)
class LockAdmin(admin.ModelAdmin):
    list_display = ["purpose", "key", "owner", "server", "acquired_at", "expires_at"]
    list_filter = ["purpose", "server"]
    search_fields = ["key", "owner"]
    readonly_fields = ["purpose", "key", "owner", "server", "acquired_at", "expires_at"]
    actions = ["release"]

    def has_add_permission(self, request):
        return False

    @admin.action(description="Release the selected locks")
    def release(self, request, queryset):
        count = queryset.count()
        queryset.delete()
        self.message_user(
            request,
            f"Released {count} lock(s). An upstream lease still in use is taken again by its worker on its next step.",
            messages.SUCCESS,
        )


@admin.register(StalePrompt)
class StalePromptAdmin(admin.ModelAdmin):
    list_display = ["prompt_id", "server", "task", "created_at"]
    list_filter = ["server"]
    readonly_fields = ["prompt_id", "server", "task", "created_at"]
