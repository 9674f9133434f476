{{/* Names and labels. */}}
{{- define "slurmproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "slurmproxy.fullname" -}}
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

{{- define "slurmproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "slurmproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "slurmproxy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "slurmproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "slurmproxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "slurmproxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "slurmproxy.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "slurmproxy.policiesConfigMap" -}}
{{- default (printf "%s-policies" (include "slurmproxy.fullname" .)) .Values.policies.existingConfigMap }}
{{- end }}

{{/*
The mounted secrets: a list of {volume, dir, secret, key, setting} for the entries of .Values.secrets
that name a Secret. `setting` is the config key the chart points at the file ("" when the proxy has
no such setting yet: the file is mounted and docs/operations.md says where).
*/}}
{{- define "slurmproxy.secretMounts" -}}
{{- $table := list
  (list "slurmJwtKey" "slurm-jwt-key" "upstream.jwt_key_file")
  (list "serviceToken" "service-token" "upstream.service_token_file")
  (list "introspectionClientSecret" "introspection-client-secret" "")
  (list "aliseApiKey" "alise-api-key" "")
  (list "auditPseudonymKey" "audit-pseudonym-key" "audit.pseudonym_key_file")
  (list "redisPassword" "redis-password" "state.redis.password_file")
  (list "postgresPassword" "postgres-password" "state.postgres.password_file")
  (list "stateHashKey" "state-hash-key" "state.hash_key_file") }}
{{- $out := list }}
{{- range $table }}
{{- $ref := index $.Values.secrets (index . 0) }}
{{- if $ref.name }}
{{- $out = append $out (dict "volume" (printf "secret-%s" (index . 1)) "dir" (printf "/etc/slurmproxy/secrets/%s" (index . 1)) "secret" $ref.name "key" $ref.key "setting" (index . 2)) }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* The proxy's config.yaml: the user's `config`, plus what the chart decides. */}}
{{- define "slurmproxy.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- $server := deepCopy (get $cfg "server" | default dict) }}
{{- $_ := set $server "host" "0.0.0.0" }}
{{- /* In a pod, TLS usually ends at the ingress: plain HTTP on the pod network, said explicitly. */}}
{{- if not (hasKey $server "tls") }}
{{- $_ := set $server "allow_plain_http" true }}
{{- end }}
{{- $_ := set $server "port" (int .Values.containerPort) }}
{{- $_ := set $cfg "server" $server }}
{{- $_ := set $cfg "policy" (dict "paths" (list "/etc/slurmproxy/policies")) }}
{{- $metrics := deepCopy (get $cfg "metrics" | default dict) }}
{{- $_ := set $metrics "enabled" .Values.metrics.enabled }}
{{- $_ := set $metrics "port" (int .Values.metrics.port) }}
{{- $_ := set $cfg "metrics" $metrics }}
{{- $audit := deepCopy (get $cfg "audit" | default dict) }}
{{- if and (eq (get $audit "sink" | default "stdout") "file") (not (get $audit "file")) }}
{{- $_ := set $audit "file" (printf "%s/audit.log" .Values.auditLog.mountPath) }}
{{- end }}
{{- $_ := set $cfg "audit" $audit }}
{{- range (include "slurmproxy.secretMounts" . | fromJsonArray) }}
{{- if .setting }}
{{- $parts := splitList "." .setting }}
{{- $section := deepCopy (get $cfg (index $parts 0) | default dict) }}
{{- if eq (len $parts) 3 }}
{{- $sub := deepCopy (get $section (index $parts 1) | default dict) }}
{{- $_ := set $sub (index $parts 2) (printf "%s/%s" .dir .key) }}
{{- $_ := set $section (index $parts 1) $sub }}
{{- else }}
{{- $_ := set $section (index $parts 1) (printf "%s/%s" .dir .key) }}
{{- end }}
{{- $_ := set $cfg (index $parts 0) $section }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Refuse values that would deploy something broken, with a message that says which value. */}}
{{- define "slurmproxy.validate" -}}
{{- $upstream := .Values.config.upstream | default dict }}
{{- if not (get $upstream "url") }}
{{- fail "config.upstream.url is required: slurmrestd's URL as the pods reach it" }}
{{- end }}
{{- $auth := get $upstream "auth" | default "mint" }}
{{- if and (eq $auth "mint") (not .Values.secrets.slurmJwtKey.name) }}
{{- fail "config.upstream.auth is mint: set secrets.slurmJwtKey.name to the Secret holding Slurm's jwt_hs256.key" }}
{{- end }}
{{- if and (eq $auth "service_token") (not .Values.secrets.serviceToken.name) }}
{{- fail "config.upstream.auth is service_token: set secrets.serviceToken.name to the Secret holding the token" }}
{{- end }}
{{- if and (not .Values.policies.existingConfigMap) (not .Values.policies.files) }}
{{- fail "policies: give policies.files or policies.existingConfigMap" }}
{{- end }}
{{- if le (int .Values.terminationGracePeriodSeconds) (add 30 (int .Values.preStopSleepSeconds) | int) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds (%d) + 30 s of graceful shutdown" (int .Values.terminationGracePeriodSeconds) (int .Values.preStopSleepSeconds)) }}
{{- end }}
{{- $backend := (get (.Values.config.state | default dict) "backend") | default "embedded" }}
{{- if and (ne $backend "shared") (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) }}
{{- fail (printf "%s with config.state.backend %s: every pod would keep its own rate limits, pool leases and caches (N pods allow N times each limit, and one user could get different pool accounts). Set config.state.backend: shared with config.state.redis (and config.state.postgres for pools or ALISE last_known), or run replicaCount: 1 without autoscaling" (ternary "autoscaling.enabled" (printf "replicaCount %d" (int .Values.replicaCount)) .Values.autoscaling.enabled) $backend) }}
{{- end }}
{{- if and (eq $backend "shared") (not (get (.Values.config.state | default dict) "redis")) }}
{{- fail "config.state.backend is shared: set config.state.redis.url (and the Secret secrets.redisPassword if Redis needs a password)" }}
{{- end }}
{{- if and (include "slurmproxy.pdb" .) (not (kindIs "string" .Values.podDisruptionBudget.minAvailable)) (not .Values.autoscaling.enabled) }}
{{- if ge (int .Values.podDisruptionBudget.minAvailable) (int .Values.replicaCount) }}
{{- fail (printf "podDisruptionBudget.minAvailable (%d) must be below replicaCount (%d), or no pod could ever be evicted" (int .Values.podDisruptionBudget.minAvailable) (int .Values.replicaCount)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when the PodDisruptionBudget is rendered: enabled, and more than one pod can run. */}}
{{- define "slurmproxy.pdb" -}}
{{- if and .Values.podDisruptionBudget.enabled (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}true{{ end }}
{{- end }}
