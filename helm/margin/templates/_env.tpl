{{/* Environment every Margin process (services and workers) shares: one view of the configuration, of which each
process reads what it uses (metering.* and serving.* included: every process that reports its fleet meters on the
same interval). */}}
{{- define "margin.commonEnv" -}}
- {name: MARGIN_LOG_FORMAT, value: json}
- {name: MARGIN_GRPC_PORT, value: "50051"}
- {name: MARGIN_METRICS_PORT, value: "9090"}
- {name: MARGIN_HOME, value: /tmp/margin}
- {name: MARGIN_ARTIFACT_DIR, value: /data/artifacts}
- {name: MARGIN_CHECKPOINT_DIR, value: /data/artifacts/checkpoints}
- {name: MARGIN_MODEL_REPOSITORY, value: /models}
- {name: MARGIN_PRICE_CATALOG, value: /etc/margin/prices.yaml}
- {name: MARGIN_REDIS_URL, value: {{ include "margin.redisUrl" . | quote }}}
- {name: MARGIN_REGISTRY_ADDR, value: {{ include "margin.serviceAddress" (list . "registry") | quote }}}
- {name: MARGIN_TRAINING_ADDR, value: {{ include "margin.serviceAddress" (list . "training") | quote }}}
- {name: MARGIN_BUDGET_ADDR, value: {{ include "margin.serviceAddress" (list . "budget") | quote }}}
- {name: MARGIN_COMPRESSION_ADDR, value: {{ include "margin.serviceAddress" (list . "compression") | quote }}}
- {name: MARGIN_INFERENCE_ADDR, value: {{ include "margin.serviceAddress" (list . "inference") | quote }}}
- {name: MARGIN_FLEET_INTERVAL_SECONDS, value: {{ .Values.metering.intervalSeconds | quote }}}
- {name: MARGIN_IDLE_POLICY, value: {{ .Values.metering.idlePolicy | quote }}}
- {name: MARGIN_SCALE_TO_ZERO_AFTER_SECONDS, value: {{ .Values.serving.scaleToZeroAfterSeconds | quote }}}
- {name: MARGIN_COLD_START_TIMEOUT_SECONDS, value: {{ .Values.serving.coldStartTimeoutSeconds | quote }}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ include "margin.databaseSecret" . }}, key: {{ include "margin.databaseKey" . }}}
- name: MARGIN_ADMIN_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "margin.adminSecret" . }}, key: {{ .Values.adminKey.key }}}
{{- end -}}

{{/* The tenant code sandbox's settings (values `sandbox`): worker pods only. MARGIN_SANDBOX_DIR is the mount of the
sandboxes' scratch emptyDir (margin.sandboxVolume). */}}
{{- define "margin.sandboxEnv" -}}
- {name: MARGIN_SANDBOX_MEMORY_MB, value: {{ .Values.sandbox.memoryMB | int64 | quote }}}
- {name: MARGIN_SANDBOX_PROCESSES, value: {{ .Values.sandbox.processes | int64 | quote }}}
- {name: MARGIN_SANDBOX_FILE_MB, value: {{ .Values.sandbox.fileMB | int64 | quote }}}
- {name: MARGIN_SANDBOX_MAX_SECONDS, value: {{ .Values.sandbox.maxSeconds | int64 | quote }}}
- {name: MARGIN_SANDBOX_SILENCE_SECONDS, value: {{ .Values.sandbox.silenceSeconds | int64 | quote }}}
- {name: MARGIN_SANDBOX_UID_BASE, value: {{ .Values.sandbox.uidBase | int64 | quote }}}
- {name: MARGIN_SANDBOX_DIR, value: {{ include "margin.sandboxDir" . }}}
{{- end -}}

{{- define "margin.sandboxDir" -}}/var/lib/margin/sandbox{{- end -}}

{{/* The sandboxes' private directories: node-local scratch, never the shared artifacts volume. */}}
{{- define "margin.sandboxVolume" -}}
- name: sandbox
  emptyDir:
    sizeLimit: {{ .Values.sandbox.scratchSize }}
{{- end -}}

{{- define "margin.commonMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: config, mountPath: /etc/margin, readOnly: true}
- {name: artifacts, mountPath: /data/artifacts}
- {name: model-repository, mountPath: /models}
{{- end -}}

{{- define "margin.commonVolumes" -}}
{{ include "margin.tmpVolume" . }}
- name: config
  configMap: {name: {{ include "margin.component" (list . "config") }}}
- name: artifacts
  persistentVolumeClaim: {claimName: {{ include "margin.component" (list . "artifacts") }}}
- name: model-repository
  persistentVolumeClaim: {claimName: {{ include "margin.component" (list . "model-repository") }}}
{{- end -}}

{{/* Changes when the price catalog or the tenant budgets change (rolls the pods that read them). */}}
{{- define "margin.configChecksum" -}}
{{- toJson (list .Values.prices .Values.tenants) | sha256sum -}}
{{- end -}}
