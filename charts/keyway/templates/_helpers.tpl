{{/* Names */}}
{{- define "keyway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "keyway.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "keyway.operator.name" -}}{{ include "keyway.fullname" . }}-operator{{- end -}}
{{- define "keyway.proxy.name" -}}{{ include "keyway.fullname" . }}-proxy{{- end -}}
{{- define "keyway.agent.name" -}}{{ include "keyway.fullname" . }}-agent{{- end -}}
{{- define "keyway.leaseName" -}}{{ default (include "keyway.operator.name" .) .Values.operator.leaderElection.leaseName }}{{- end -}}

{{/* Labels */}}
{{- define "keyway.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: keyway
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of objects that belong to no one component */}}
{{- define "keyway.labels" -}}
{{ include "keyway.commonLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "operator") */}}
{{- define "keyway.selector" -}}
app.kubernetes.io/name: keyway-{{ .component }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- end -}}

{{- define "keyway.componentLabels" -}}
{{ include "keyway.commonLabels" .ctx }}
{{ include "keyway.selector" . }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Images */}}
{{- define "keyway.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- define "keyway.agent.image" -}}
{{- $repo := default .Values.proxy.image.repository .Values.agent.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.proxy.image.tag) .Values.agent.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* Secret names */}}
{{- define "keyway.secret.hostKey" -}}{{ default (printf "%s-proxy-host-key" (include "keyway.fullname" .)) .Values.secrets.hostKey.existingSecret }}{{- end -}}
{{- define "keyway.secret.gatewayIdentity" -}}{{ default (printf "%s-gateway-identity" (include "keyway.fullname" .)) .Values.secrets.gatewayIdentity.existingSecret }}{{- end -}}
{{- define "keyway.secret.relayCA" -}}{{ default (printf "%s-relay-ca" (include "keyway.fullname" .)) .Values.secrets.relayCA.existingSecret }}{{- end -}}
{{- define "keyway.secret.token" -}}{{ default (printf "%s-snapshot-token" (include "keyway.fullname" .)) .Values.secrets.snapshotToken.existingSecret }}{{- end -}}
{{- define "keyway.secret.connectTLS" -}}{{ default (printf "%s-connect-tls" (include "keyway.fullname" .)) .Values.secrets.connectTLS.existingSecret }}{{- end -}}
{{- define "keyway.secret.snapshotTLS" -}}{{ default (printf "%s-snapshot-tls" (include "keyway.fullname" .)) .Values.snapshotTLS.existingSecret }}{{- end -}}

{{/* The operator's snapshot endpoint as proxies and agents dial it */}}
{{- define "keyway.endpoint" -}}
{{- printf "%s://%s.%s.svc:7070" (ternary "https" "http" .Values.snapshotTLS.enabled) (include "keyway.operator.name" .) .Release.Namespace -}}
{{- end -}}

{{/* The port users dial for SSH */}}
{{- define "keyway.publicSshPort" -}}
{{- if not (kindIs "invalid" .Values.operator.publicSshPort) -}}
{{- .Values.operator.publicSshPort -}}
{{- else if eq .Values.proxy.mode "hostNetwork" -}}
{{- .Values.proxy.hostNetwork.sshPort -}}
{{- else -}}
{{- .Values.proxy.loadBalancer.sshPort -}}
{{- end -}}
{{- end -}}

{{/*
Pod annotations: the ones asking a plain Prometheus to scrape port .port,
then .extra. (dict "ctx" $ "port" PORT "extra" MAP)
*/}}
{{- define "keyway.podAnnotations" -}}
{{- $a := dict -}}
{{- if .ctx.Values.metrics.podAnnotations -}}
{{- $_ := set $a "prometheus.io/scrape" "true" -}}
{{- $_ := set $a "prometheus.io/port" (toString .port) -}}
{{- $_ := set $a "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- $a = merge $a (default (dict) .extra) -}}
{{- if $a }}
annotations:
  {{- toYaml $a | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* Container security context of every non-root container */}}
{{- define "keyway.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* "ip:port" with brackets around an IPv6 address: (dict "ip" IP "port" PORT) */}}
{{- define "keyway.hostPort" -}}
{{- if contains ":" .ip -}}[{{ .ip }}]:{{ .port }}{{- else -}}{{ .ip }}:{{ .port }}{{- end -}}
{{- end -}}
