from django.contrib import admin

from .models import GeneratedImage, Generation


class GeneratedImageInline(admin.TabularInline):
    model = GeneratedImage
    extra = 0
    readonly_fields = ("index", "file", "seed", "width", "height")
    can_delete = False


@admin.register(Generation)
class GenerationAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "model_id", "status", "seed", "backend", "attempts", "created_at", "finished_at")
    list_filter = ("status", "kind", "model_id", "backend")
    search_fields = ("id", "model_id", "params__prompt")
    readonly_fields = [f.name for f in Generation._meta.fields]
    inlines = [GeneratedImageInline]
    date_hierarchy = "created_at"

    # Deleting here does what DELETE /api/results/<id>/ does: stop the job, remove its files.
    def delete_model(self, request, obj):  # noqa: ANN001, ANN201
        from .services.jobs import generation_delete

        generation_delete(generation=obj)

    def delete_queryset(self, request, queryset):  # noqa: ANN001, ANN201
        from .services.jobs import generation_delete

        for generation in queryset:
            generation_delete(generation=generation)
