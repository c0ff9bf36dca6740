{{/* Names: trunc 63 | trimSuffix "-" everywhere a name becomes a Kubernetes object name or label. */}}
{{- define "margin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "margin.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's object name: <fullname>-<component>. Call with (list $ "component"). */}}
{{- define "margin.component" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "margin.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "margin.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of a component. Call with (list $ "component"). */}}
{{- define "margin.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "margin.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "margin.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "margin.chart" $root }}
{{ include "margin.selectorLabels" . }}
app.kubernetes.io/part-of: margin
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
{{- end -}}

{{/* An image reference from {repository, tag, digest}: the digest wins. */}}
{{- define "margin.imageRef" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{/* Margin's own image. Call with (list $ "service" | "gpu-worker"). */}}
{{- define "margin.image" -}}
{{- $root := index . 0 -}}
{{- $img := $root.Values.image -}}
{{- include "margin.imageRef" (dict "repository" (printf "%s/margin-%s" $img.registry (index . 1)) "tag" (default $root.Chart.AppVersion $img.tag) "digest" $img.digest) -}}
{{- end -}}

{{/* The Secret and key holding the database URL. */}}
{{- define "margin.databaseSecret" -}}
{{- if .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else if .Values.postgresql.existingSecret -}}
{{- .Values.postgresql.existingSecret -}}
{{- else -}}
{{- include "margin.component" (list . "postgresql") -}}
{{- end -}}
{{- end -}}

{{- define "margin.databaseKey" -}}
{{- if .Values.database.existingSecret -}}{{ .Values.database.key }}{{- else -}}DATABASE_URL{{- end -}}
{{- end -}}

{{- define "margin.adminSecret" -}}
{{- default (include "margin.component" (list . "admin")) .Values.adminKey.existingSecret -}}
{{- end -}}

{{/* The Secret holding Triton's control key (model control answers only it): read by the gateway and Triton only. */}}
{{- define "margin.tritonControlSecret" -}}
{{- default (include "margin.component" (list . "triton-control")) .Values.triton.controlKey.existingSecret -}}
{{- end -}}

{{- define "margin.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s:6379/0" (include "margin.component" (list . "redis")) -}}
{{- else -}}
{{- required "redis.url is required when redis.enabled is false" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* The gRPC address of a Margin service, in the release's namespace. Call with (list $ "registry"). */}}
{{- define "margin.serviceAddress" -}}
{{- printf "%s:50051" (include "margin.component" .) -}}
{{- end -}}

{{/* {"deviceClass": "dns:///<triton pool>-replicas:8001", ...} for MARGIN_TRITON_URLS: each pool's headless Service,
whose name (in the release's namespace, like every service address here) resolves to every ready replica. */}}
{{- define "margin.tritonUrls" -}}
{{- $root := . -}}
{{- $urls := dict -}}
{{- range .Values.triton.pools -}}
{{- $_ := set $urls .deviceClass (printf "dns:///%s-replicas:8001" (include "margin.component" (list $root (printf "triton-%s" .name)))) -}}
{{- end -}}
{{- toJson $urls -}}
{{- end -}}

{{/* {"deviceClass": "<HPA / ScaledObject name>", ...} for MARGIN_AUTOSCALER_TARGETS. */}}
{{- define "margin.autoscalerTargets" -}}
{{- $root := . -}}
{{- $targets := dict -}}
{{- range .Values.triton.pools -}}
{{- $_ := set $targets .deviceClass (include "margin.component" (list $root (printf "triton-%s" .name))) -}}
{{- end -}}
{{- toJson $targets -}}
{{- end -}}

{{/* The engine every pool uses (the autoscaler acts on one kind of object; the schema allows hpa | keda). */}}
{{- define "margin.autoscalerEngine" -}}
{{- $engines := list -}}
{{- range .Values.triton.pools -}}
{{- $engines = append $engines .autoscaling.engine -}}
{{- end -}}
{{- $engines = uniq $engines -}}
{{- if gt (len $engines) 1 -}}
{{- fail (printf "triton.pools: every pool must use the same autoscaling engine (the budget autoscaler acts on one kind of object); got %s" (join ", " $engines)) -}}
{{- end -}}
{{- first $engines -}}
{{- end -}}

{{/*
A serving pool's initial max replicas: floor(budget per hour / replica price per hour), in integer micros.
Budget per hour = amount / 24 (daily) or / 730 (monthly, 8760 h / 12). Call with (list $ pool).
*/}}
{{- define "margin.poolMaxReplicas" -}}
{{- $root := index . 0 -}}
{{- $pool := index . 1 -}}
{{- $device := get $root.Values.prices.devices $pool.deviceClass -}}
{{- if not $device -}}
{{- fail (printf "triton.pools[%s]: no price for device class %q in prices.devices" $pool.name $pool.deviceClass) -}}
{{- end -}}
{{- $priceMicros := int64 (round (mulf (float64 $device.usd_per_hour) 1000000) 0) -}}
{{- if le $priceMicros 0 -}}
{{- fail (printf "prices.devices.%s.usd_per_hour must be positive to size pool %s" $pool.deviceClass $pool.name) -}}
{{- end -}}
{{- $hours := ternary 24 730 (eq $pool.autoscaling.budget.period "daily") -}}
{{- $budgetMicros := int64 (round (mulf (float64 $pool.autoscaling.budget.amount) 1000000) 0) -}}
{{- $max := div (div $budgetMicros $hours) $priceMicros -}}
{{- if lt $max (int64 $pool.autoscaling.minReplicas) -}}
{{- fail (printf "triton.pools[%s]: the budget (%v per %s) pays for %d replicas of %s at %s/h, fewer than minReplicas %d" $pool.name $pool.autoscaling.budget.amount $pool.autoscaling.budget.period $max $pool.deviceClass $device.usd_per_hour (int $pool.autoscaling.minReplicas)) -}}
{{- end -}}
{{- $max -}}
{{- end -}}

{{/* Tolerations and node selector for a GPU pool: the pool's own plus nvidia.com/gpu when it has GPUs. */}}
{{- define "margin.poolScheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if or .tolerations (gt (int .gpus) 0) }}
tolerations:
  {{- with .tolerations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- if gt (int .gpus) 0 }}
  - key: nvidia.com/gpu
    operator: Exists
    effect: NoSchedule
  {{- end }}
{{- end }}
{{- end -}}

{{/* Resources (a pool without any gets 1-2 CPUs and 2-4 GiB), with nvidia.com/gpu limits for a GPU pool. */}}
{{- define "margin.resources" -}}
{{- $res := deepCopy (default (dict "requests" (dict "cpu" "1" "memory" "2Gi") "limits" (dict "cpu" "2" "memory" "4Gi")) .resources) -}}
{{- if gt (int (default 0 .gpus)) 0 -}}
{{- $limits := default dict $res.limits -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
resources:
  {{- toYaml $res | nindent 2 }}
{{- end -}}

{{/* A writable /tmp on a read-only root filesystem. */}}
{{- define "margin.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- end -}}
