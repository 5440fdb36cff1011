{{/* Names and labels, the conventional way (helm create's helpers). */}}
{{- define "canarygate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "canarygate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "canarygate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "canarygate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "canarygate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "canarygate.labels" -}}
helm.sh/chart: {{ include "canarygate.chart" . }}
{{ include "canarygate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "canarygate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "canarygate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "canarygate.policiesConfigMap" -}}
{{- default (printf "%s-policies" (include "canarygate.fullname" .)) .Values.policies.existingConfigMap }}
{{- end }}

{{/* Rollout state, the controller lease and statistics are per process without Redis: more replicas need it. */}}
{{- define "canarygate.redisConfigured" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret.name }}true{{ end }}
{{- end }}

{{- define "canarygate.checkScaleOut" -}}
{{- $most := int .Values.replicaCount }}
{{- if .Values.autoscaling.enabled }}{{ $most = int .Values.autoscaling.maxReplicas }}{{ end }}
{{- if and (gt $most 1) (not (include "canarygate.redisConfigured" .)) }}
{{- fail (printf "canarygate: %d replicas share rollout state, the controller lease and rollout statistics only through Redis: set redis.url (or redis.existingSecret.name), or run replicaCount: 1 without autoscaling" $most) }}
{{- end }}
{{- end }}
