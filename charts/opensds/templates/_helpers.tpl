{{/* The project image reference. */}}
{{- define "opensds.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "opensds.labels" -}}
app.kubernetes.io/part-of: opensds
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{/* --verbose when logLevel is debug. */}}
{{- define "opensds.verbose" -}}
{{- if eq .Values.logLevel "debug" }}, --verbose{{ end }}
{{- end }}

{{/* Scheduling knobs of one component: nodeSelector and tolerations. */}}
{{- define "opensds.placement" -}}
{{- with .nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The namespace the components and their RBAC live in (the dock's admission policy names it). */}}
{{- define "opensds.namespace" -}}
{{- if ne .Release.Namespace "opensds-system" }}
{{- fail "install into the opensds-system namespace: helm install opensds charts/opensds -n opensds-system --create-namespace (the operator's generated credentials and the dock's admission policy live there)" }}
{{- end }}
{{- .Release.Namespace }}
{{- end }}
