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
